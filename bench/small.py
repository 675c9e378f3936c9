"""Small jobs are instant: cold commands, run as a user runs them, against the obvious tool.

    python -m bench.small --out bench/results/small.json [--repeats 3]

Every measurement is a fresh process (`hindsight ...` or `python -c ...`) timed from start
to exit, repeated `--repeats` times (the median is reported, and the fastest); the
machine's load average is recorded before and after.

1. Ingest: a 40,000-step Minari dataset (200 Pendulum-shaped episodes of 200 steps,
   written with `minari.create_dataset_from_buffers`: no download, no jax).
   Baseline: a cold Python process that loads it with minari and walks every episode
   (`minari.load_dataset(id).iterate_episodes()`); its load-and-iterate time alone is
   recorded too (the process start and `import minari` excluded).
   Measured: `hindsight ingest DIR OUT` (small: it runs in the process, no Ray), and the
   same command with Ray forced (HINDSIGHT_IN_PROCESS_STEPS=0: what every job paid before).
   The sides alternate round by round. Also recorded: which of Ray, torch, Polars, pandas
   and gymnasium a cold ingest imports (it should import none of them), and the cold
   `hindsight --help` and `hindsight info` against a bare interpreter and against importing
   NumPy, pyarrow and pydantic (what every command needs).
2. The demo's data steps, end to end: `hindsight collect Pendulum-v1` (300 episodes at
   noise 0, 0.25, 0.5, 0.75, 1), `hindsight relabel --with returns --with skill:levels=4
   --with language`, `hindsight shard --condition return_to_go,skill,description`: three
   cold commands; and the same three with Ray forced. Both must write the same dataset ids.
3. Ray's own costs on this machine, which set the in-process limit (jobs/runtime.py): a
   cold start (import, `init_ray`, first tasks) and the cost per part (no-op tasks); and
   jobs at the limit (`--limit-steps`, 1M steps of obs 17 / action 6 in 4 parts: ingest,
   relabel `returns`, relabel `goals` future k=4, shard), once in the process and once with
   Ray forced: the limit is right when the process still wins there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench import save_results

EPISODES = 200
LENGTH = 200
DATASET_ID = "bench/pendulum-40k-v0"
NOISE = "0,0.25,0.5,0.75,1"

MINARI_ITERATION = """
import sys, time
started = time.perf_counter()
import minari
imported = time.perf_counter()
steps = sum(len(e.actions) for e in minari.load_dataset(sys.argv[1]).iterate_episodes())
print(steps, time.perf_counter() - imported, imported - started)
"""

HEAVY_LIBRARIES = ("ray", "torch", "polars", "pandas", "gymnasium")
LOADED_BY_INGEST = f"""
import json, sys
from jobs.cli import main
assert main(["ingest", *sys.argv[1:]]) == 0
print(json.dumps([name for name in {HEAVY_LIBRARIES!r} if name in sys.modules]))
"""
COMMON_IMPORTS = "import numpy, pyarrow, pyarrow.parquet, pydantic"

RAY_COSTS = """
import json, time
started = time.perf_counter()
from jobs.runtime import RayExecutor, init_ray

def noop(task):
    return {"steps": 0}

init_ray()
RayExecutor().map(noop, list(range(4)), description="warm-up")
cold = time.perf_counter() - started
started = time.perf_counter()
RayExecutor().map(noop, list(range(200)), description="parts")
print(json.dumps({"cold_start_s": cold, "per_part_s": (time.perf_counter() - started) / 200}))
"""


def make_minari_dataset(root: Path) -> Path:
    """200 episodes of 200 steps (obs 3, action 1), as minari writes them."""
    import minari
    from minari.data_collector import EpisodeBuffer

    os.environ["MINARI_DATASETS_PATH"] = str(root)
    rng = np.random.default_rng(0)
    buffers = [
        EpisodeBuffer(
            id=episode,
            observations=rng.normal(size=(LENGTH + 1, 3)).astype(np.float32),
            actions=rng.uniform(-2, 2, size=(LENGTH, 1)).astype(np.float32),
            rewards=list(rng.normal(size=LENGTH)),
            terminations=[False] * LENGTH,
            truncations=[False] * (LENGTH - 1) + [True],
        )
        for episode in range(EPISODES)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari warns about what a scripted dataset lacks
        minari.create_dataset_from_buffers(
            DATASET_ID, buffers, env="Pendulum-v1", algorithm_name="scripted"
        )
    return root / DATASET_ID


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Wall seconds of one cold process, and what it printed; it must succeed."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(samples), 3),
        "min_s": round(min(samples), 3),
        "runs_s": [round(s, 3) for s in samples],
    }


def dataset_id(uri: Path) -> str:
    return json.loads((uri / "manifest.json").read_text())["dataset_id"]


def hindsight(*arguments: str) -> list[str]:
    return [str(Path(sys.executable).parent / "hindsight"), *arguments]


def measure_ingest(workdir: Path, source: Path, env: dict, repeats: int) -> dict:
    """The three sides alternate, one cold process each per round."""
    minari_env = {**env, "MINARI_DATASETS_PATH": str(workdir / "minari")}
    ray_env = {**env, "HINDSIGHT_IN_PROCESS_STEPS": "0"}
    script, walk, imports, steps = [], [], [], 0
    runs: dict[str, list[float]] = {"in_process": [], "ray_forced": []}
    ids = set()
    for attempt in range(repeats):
        seconds, out = timed(
            [sys.executable, "-c", MINARI_ITERATION, DATASET_ID], minari_env, workdir
        )
        count, iterate_s, import_s = out.split()
        script.append(seconds)
        walk.append(float(iterate_s))
        imports.append(float(import_s))
        steps = int(count)
        for mode, mode_env in (("in_process", env), ("ray_forced", ray_env)):
            out = workdir / f"ingest-{mode}-{attempt}"
            seconds, _ = timed(hindsight("ingest", str(source), str(out)), mode_env, workdir)
            runs[mode].append(seconds)
            ids.add(dataset_id(out))
            shutil.rmtree(out)
    hindsight_s = statistics.median(runs["in_process"])
    return {
        "steps": steps,
        "baseline_minari_cold_process": summary(script),
        "baseline_minari_load_and_iterate_only": summary(walk),
        "baseline_minari_import_s": round(statistics.median(imports), 3),
        "hindsight_ingest_cold": summary(runs["in_process"]),
        "hindsight_ingest_cold_ray_forced": summary(runs["ray_forced"]),
        "same_dataset_id": len(ids) == 1,
        # The goal: within 2x of minari's own iteration.
        "ingest_vs_minari_cold_process": round(hindsight_s / statistics.median(script), 2),
        "ingest_vs_minari_cold_process_best": round(min(runs["in_process"]) / min(script), 2),
        "ingest_vs_minari_load_and_iterate_only": round(hindsight_s / statistics.median(walk), 2),
        "ray_forced_vs_in_process": round(statistics.median(runs["ray_forced"]) / hindsight_s, 2),
        "libraries_a_cold_ingest_loads": loaded_libraries(workdir, source, env),
    }


def loaded_libraries(workdir: Path, source: Path, env: dict) -> list[str]:
    """Which of the heavy libraries a cold `hindsight ingest` of the set imports (none
    should be: it has no use for them)."""
    out = workdir / "ingest-imports"
    _, printed = timed(
        [sys.executable, "-c", LOADED_BY_INGEST, str(source), str(out)], env, workdir
    )
    shutil.rmtree(out)
    return json.loads(printed.strip().splitlines()[-1])


def measure_cold_commands(workdir: Path, source: Path, env: dict, repeats: int) -> dict:
    """`hindsight --help` and `hindsight info` cold, against a bare interpreter start and
    against importing the libraries every command needs (NumPy, pyarrow, pydantic)."""
    dataset = workdir / "info-dataset"
    timed(hindsight("ingest", str(source), str(dataset)), env, workdir)
    commands = {
        "python_start": [sys.executable, "-c", "pass"],
        "python_imports_numpy_pyarrow_pydantic": [sys.executable, "-c", COMMON_IMPORTS],
        "hindsight_help": hindsight("--help"),
        "hindsight_info": hindsight("info", str(dataset)),
    }
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            runs[name].append(timed(command, env, workdir)[0])
    shutil.rmtree(dataset)
    imports_s = statistics.median(runs["python_imports_numpy_pyarrow_pydantic"])
    return {
        **{name: summary(samples) for name, samples in runs.items()},
        "help_vs_common_imports": round(statistics.median(runs["hindsight_help"]) / imports_s, 2),
        "info_vs_common_imports": round(statistics.median(runs["hindsight_info"]) / imports_s, 2),
    }


def demo_steps(out: Path) -> list[list[str]]:
    raw, relabeled, shards = out / "raw", out / "relabeled", out / "shards"
    return [
        hindsight("collect", "Pendulum-v1", str(raw), "--episodes", "300", "--noise", NOISE)
        + ["--episodes-per-part", "75"],  # as the demo cuts 300 episodes
        hindsight("relabel", str(raw), str(relabeled), "--with", "returns")
        + ["--with", "skill:levels=4", "--with", "language"],
        hindsight("shard", str(relabeled), str(shards), "--window", "10")
        + ["--condition", "return_to_go,skill,description", "--shard-steps", "20000"],
    ]


def measure_demo(workdir: Path, env: dict, repeats: int) -> dict:
    results: dict[str, dict] = {}
    ids: dict[str, set[str]] = {"raw": set(), "relabeled": set()}
    for mode, limit in (("in_process", None), ("ray_forced", "0")):
        mode_env = dict(env)
        if limit is not None:
            mode_env["HINDSIGHT_IN_PROCESS_STEPS"] = limit
        totals, per_step = [], {"collect": [], "relabel": [], "shard": []}
        for attempt in range(repeats):
            out = workdir / f"demo-{mode}-{attempt}"
            out.mkdir()
            total = 0.0
            for name, command in zip(per_step, demo_steps(out)):
                seconds, _ = timed(command, mode_env, workdir)
                per_step[name].append(seconds)
                total += seconds
            totals.append(total)
            for version in ids:
                ids[version].add(dataset_id(out / version))
            shutil.rmtree(out)
        results[mode] = {
            "total": summary(totals),
            **{name: summary(samples) for name, samples in per_step.items()},
        }
    in_process = results["in_process"]["total"]["median_s"]
    return {
        "episodes": 300,
        "steps": 300 * 200,
        **results,
        "same_dataset_ids": all(len(found) == 1 for found in ids.values()),
        "in_process_under_15_s": in_process < 15.0,
        "ray_forced_vs_in_process": round(
            results["ray_forced"]["total"]["median_s"] / in_process, 2
        ),
    }


def write_npz(path: Path, steps: int) -> None:
    """A D4RL-style .npz: obs 17, action 6, episodes of 1000 steps."""
    rng = np.random.default_rng(0)
    np.savez(
        path,
        observations=rng.normal(size=(steps, 17)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(steps, 6)).astype(np.float32),
        rewards=rng.normal(size=steps).astype(np.float32),
        terminals=np.zeros(steps, bool),
        timeouts=np.arange(1, steps + 1) % 1000 == 0,
    )


def measure_limit(workdir: Path, env: dict, steps: int) -> dict:
    source = workdir / "limit.npz"
    write_npz(source, steps)
    goals = "goals:strategy=future,k=4,achieved=observation[0:3]"
    results: dict[str, dict[str, float]] = {}
    for mode, limit in (("in_process", str(steps)), ("ray_forced", "0")):
        out = workdir / f"limit-{mode}"
        out.mkdir()
        jobs = {
            "ingest": hindsight("ingest", str(source), str(out / "raw"), "--part-steps")
            + [str(steps // 4)],
            "relabel_returns": hindsight("relabel", str(out / "raw"), str(out / "returns"))
            + ["--with", "returns"],
            "relabel_goals": hindsight("relabel", str(out / "raw"), str(out / "goals"))
            + ["--with", goals],
            "shard": hindsight("shard", str(out / "returns"), str(out / "shards"))
            + ["--condition", "return_to_go"],
        }
        mode_env = {**env, "HINDSIGHT_IN_PROCESS_STEPS": limit}
        results[mode] = {
            name: round(timed(job, mode_env, workdir)[0], 2) for name, job in jobs.items()
        }
        shutil.rmtree(out)
    source.unlink()
    ratios = {
        name: round(results["ray_forced"][name] / seconds, 2)
        for name, seconds in results["in_process"].items()
    }
    return {"steps": steps, "parts": 4, **results, "ray_forced_vs_in_process": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/small.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--limit-steps", type=int, default=1_000_000, help="0: skip part 3's jobs")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hs-bench-small-"))
    workdir.mkdir(parents=True, exist_ok=True)
    project = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "RAY_TMPDIR": str(workdir / "ray"),  # never /tmp/ray
        "PYTHONPATH": str(project),
        "TQDM_DISABLE": "1",
    }
    env.pop("HINDSIGHT_IN_PROCESS_STEPS", None)
    Path(env["RAY_TMPDIR"]).mkdir(exist_ok=True)
    # Cold is a fresh process with the bytecode in place, as every run after the first
    # (with PYTHONDONTWRITEBYTECODE set, each edited module would compile in every run).
    packages = ("engine", "jobs", "schemas", "relabelers", "trainers")
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], cwd=project, check=True)
    results: dict = {
        "benchmark": "small",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_1min_before": round(os.getloadavg()[0], 2),
    }
    try:
        source = make_minari_dataset(workdir / "minari")
        results["ingest_minari_40k"] = measure_ingest(workdir, source, env, args.repeats)
        print(json.dumps(results["ingest_minari_40k"], indent=2), flush=True)
        results["cold_commands"] = measure_cold_commands(workdir, source, env, args.repeats)
        print(json.dumps(results["cold_commands"], indent=2), flush=True)
        results["demo_data_steps"] = measure_demo(workdir, env, args.repeats)
        print(json.dumps(results["demo_data_steps"], indent=2), flush=True)
        _, out = timed([sys.executable, "-c", RAY_COSTS], env, project)
        ray = json.loads(out.strip().splitlines()[-1])
        results["ray"] = {key: round(value, 4) for key, value in ray.items()}
        if args.limit_steps:
            results["jobs_at_the_limit"] = measure_limit(workdir, env, args.limit_steps)
            print(json.dumps(results["jobs_at_the_limit"], indent=2), flush=True)
    finally:
        results["load_average_1min_after"] = round(os.getloadavg()[0], 2)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    save_results(results, args.out)


if __name__ == "__main__":
    main()
