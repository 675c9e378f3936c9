"""Seconds to plan a LeRobot v2.1 dataset on S3 (one Parquet footer and one MP4 header per
episode), the reads one after another (the baseline) against a bounded pool of threads
(engine/sources/lerobot_meta.py `map_io`), in the same run on the same bucket.

    python -m bench.lerobot_plan --out bench/results/lerobot_plan.json \
        [--episodes 50] [--delays 0,0.02] [--repeats 3]

The bucket is moto's S3 server in its own process on loopback. Loopback has no network
wait, so each `--delays` value also runs behind a TCP proxy that holds every request
chunk that long before passing it on (0.02: a 20 ms round trip, as a bucket in another
zone); delay 0 talks to moto directly. Each figure is the median of `--repeats` plans;
the load average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import save_results


def start_delay_proxy(upstream: int, delay: float) -> int:
    """A loopback TCP proxy to `upstream` that holds each client chunk `delay` seconds
    (in a daemon thread); returns its port."""
    from tests.conftest import free_port

    port = free_port()

    async def pipe(reader, writer, wait: float) -> None:
        try:
            while data := await reader.read(65536):
                if wait:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(client_reader, writer, delay), pipe(reader, client_writer, 0))

    def serve() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", port))
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    time.sleep(0.3)
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/lerobot_plan.json")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--delays", default="0,0.02", help="Seconds added per request.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import boto3

    import engine.sources.lerobot_meta as meta
    from engine.ingest import plan_ingest
    from tests import lerobot_datasets as lrd
    from tests.conftest import free_port

    load_at_start = os.getloadavg()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict = {"episodes": args.episodes, "load_at_start": load_at_start, "runs": []}
    try:
        direct = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ENDPOINT_URL=direct,
            AWS_ACCESS_KEY_ID="bench-key-id",
            AWS_SECRET_ACCESS_KEY="bench-secret-key",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
        )
        for _ in range(50):  # moto's server starting
            try:
                boto3.client("s3", endpoint_url=direct).create_bucket(Bucket="bench")
                break
            except Exception:  # not listening yet
                time.sleep(0.2)
        local = str(Path(tempfile.mkdtemp(prefix="hs-bench-plan-")) / "v21")
        lrd.write_v21(local, lrd.make_data([6] * args.episodes, camera=(16, 16)))
        uri = lrd.upload(local, "s3://bench/lerobot/v21")
        threads = meta.IO_THREADS
        for delay in (float(d) for d in args.delays.split(",")):
            endpoint = f"http://127.0.0.1:{start_delay_proxy(port, delay)}" if delay else direct
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            seconds: dict[int, list[float]] = {1: [], threads: []}
            for _ in range(args.repeats):
                for workers in seconds:
                    meta.IO_THREADS = workers
                    started = time.perf_counter()
                    plan = plan_ingest(uri, format="lerobot")
                    seconds[workers].append(time.perf_counter() - started)
                    assert plan.episodes == args.episodes
            meta.IO_THREADS = threads
            one, many = (statistics.median(seconds[w]) for w in (1, threads))
            results["runs"].append(
                {
                    "delay_s": delay,
                    "one_after_another_s": round(one, 3),
                    f"threads_{threads}_s": round(many, 3),
                    "speedup": round(one / many, 2),
                }
            )
    finally:
        server.terminate()
        server.wait()
    results["load_at_end"] = os.getloadavg()
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
