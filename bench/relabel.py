"""Relabel throughput: kernels and whole jobs against a NumPy ceiling and a pandas baseline.

    python -m bench.relabel --out bench/results/relabel.json [--steps 20000000]

Data: episodes of `--episode-length` steps (obs 17 floats, action 6), written as a dataset
of ~1M-step parts. Measured on the same data, in this order:

1. kernels, in memory, on one part: `returns` (gamma=0.99) and `goals` (strategy=future,
   k=4, achieved=observation[0:3]), i.e. `relabeler.relabel` on Arrow tables;
2. the NumPy single-pass ceiling over the same arrays: return-to-go as one vectorized
   backward sweep over time (episodes side by side, which needs equal lengths: the
   ceiling, not a general method), k future-goal gathers, and reward / reached per goal;
3. what a user writes today: a pandas groupby-apply over episodes computing the same
   columns as each job (on `--pandas-steps` steps): return-to-go with a backward loop for
   `returns`; for `goals`, k future goals per step with their source step, reward and
   reached flag, vectorized with NumPy inside each episode. Also the issue's reference
   computation, return-to-go plus one future goal index per step;
4. whole jobs (`Relabel(...).run()`: read, relabel, write the new group, commit) on the embedded
   Ray, Ray start-up timed separately; the peak RSS of the largest process and of the
   whole process tree, at the full size and at a quarter of it (memory must stay flat).
   `vs_pandas_per_core`: the job's steps/s per CPU (it uses them all) over pandas' (one);
   `vs_pandas_per_cpu_second`: steps per CPU second of the job's whole process tree over
   pandas' (less disturbed by other load on a shared machine).

Where a `goals` part's time goes (read, kernel, write by column, layouts): bench/goals.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from bench import save_results
from bench.memory import TreeMemory

if TYPE_CHECKING:
    import pandas as pd

OBS_DIM = 17
ACTION_DIM = 6
GAMMA = 0.99
K = 4
THRESHOLD = 0.05
GOAL_SLICE = slice(0, 3)


# ---------------------------------------------------------------- data


def part_tables(first_episode: int, episodes: int, length: int, seed: int):
    from schemas import steps as cols

    rng = np.random.default_rng(seed)
    total = episodes * length
    ids = np.repeat(np.arange(first_episode, first_episode + episodes, dtype=np.int64), length)
    ends = np.zeros(total, dtype=bool)
    ends[length - 1 :: length] = True
    steps = pa.table(
        {
            cols.EPISODE_ID: ids,
            cols.T: np.tile(np.arange(length, dtype=np.int32), episodes),
            cols.OBSERVATION: cols.vectors_to_arrow(
                rng.standard_normal((total, OBS_DIM), dtype=np.float32)
            ),
            cols.ACTION: cols.vectors_to_arrow(
                rng.uniform(-1, 1, (total, ACTION_DIM)).astype(np.float32)
            ),
            cols.REWARD: rng.standard_normal(total, dtype=np.float32),
            cols.TERMINATED: ends,
            cols.TRUNCATED: np.zeros(total, dtype=bool),
        }
    )
    rewards = steps.column(cols.REWARD).to_numpy().reshape(episodes, length)
    episode_table = pa.table(
        {
            cols.EPISODE_ID: np.arange(first_episode, first_episode + episodes, dtype=np.int64),
            cols.LENGTH: np.full(episodes, length, dtype=np.int64),
            cols.RETURN: rewards.sum(axis=1, dtype=np.float64).astype(np.float32),
            cols.ENV_ID: ["Bench-v0"] * episodes,
            cols.SOURCE: ["bench"] * episodes,
        }
    )
    return steps, episode_table


def write_bench_dataset(uri: str, steps: int, length: int, part_steps: int) -> None:
    """Part by part, so generating 20M steps never holds more than one part."""
    from engine.writer import VersionWriter, base_manifest

    episodes_per_part = max(part_steps // length, 1)
    total_episodes = max(steps // length, 1)
    with VersionWriter(uri) as writer:
        written = []
        for index, first in enumerate(range(0, total_episodes, episodes_per_part)):
            count = min(episodes_per_part, total_episodes - first)
            step_table, episode_table = part_tables(first, count, length, seed=index)
            written.append(writer.write_part(index, step_table, episode_table))
        writer.commit(
            base_manifest(writer.uri, written, operation="ingest", command="bench.relabel")
        )


# ---------------------------------------------------------------- the three ways


def numpy_ceiling(rewards: np.ndarray, achieved: np.ndarray, length: int, seed: int) -> float:
    """Single pass: a backward sweep over time with episodes side by side (contiguous
    rows of a (time, episodes) array), then k future-goal gathers of whole goal rows."""
    start = time.perf_counter()
    r = np.ascontiguousarray(rewards.reshape(-1, length).T, dtype=np.float64)  # (T, E)
    rtg = np.empty_like(r)
    running = np.zeros(r.shape[1])
    for t in range(length - 1, -1, -1):
        running = r[t] + GAMMA * running
        rtg[t] = running
    rtg = rtg.T.reshape(-1).astype(np.float32)
    rng = np.random.default_rng(seed)
    n = len(rewards)
    t = np.tile(np.arange(length), n // length)
    low = np.minimum(t + 1, length - 1)
    base = np.arange(n) - t
    goal_rows = np.empty((n, K), dtype=np.int64)
    for j in range(K):
        goal_rows[:, j] = base + low + (rng.random(n) * (length - low)).astype(np.int64)
    row_type = np.dtype((np.void, achieved.shape[1] * 4))
    achieved = np.ascontiguousarray(achieved, dtype=np.float32)
    goals = np.take(achieved.view(row_type).reshape(-1), goal_rows).view(np.float32)
    goals = goals.reshape(n, K, -1)
    # The same columns as the relabeler: source steps, and reward / reached per goal
    # against the achieved goal after the step.
    goal_steps = (goal_rows - base[:, None]).astype(np.int32)
    after = np.minimum(np.arange(1, n + 1), base + length - 1)
    achieved_after = achieved[after]
    squared = np.zeros((n, K), dtype=np.float32)
    for g in range(achieved.shape[1]):
        difference = goals[:, :, g] - achieved_after[:, g, None]
        squared += difference * difference
    reached = squared <= THRESHOLD**2
    reached.astype(np.float32), goal_steps
    return time.perf_counter() - start


def _pandas_seconds(
    frame: pd.DataFrame, columns: list[str], per_episode: Callable
) -> tuple[float, float]:
    """The best wall seconds and the best CPU seconds of two runs."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(2):
        start, start_cpu = time.perf_counter(), time.process_time()
        frame.groupby("episode_id", sort=False)[columns].apply(per_episode)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu


def _return_to_go(rewards: np.ndarray) -> np.ndarray:
    rtg = np.empty(len(rewards))
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        running = rewards[i] + GAMMA * running
        rtg[i] = running
    return rtg


def pandas_frame(steps: pa.Table, achieved: np.ndarray) -> tuple[pd.DataFrame, list[str]]:
    """What the pandas baselines start from: episode id, reward and the achieved goal (one
    column per dimension) of every step, in memory; and the achieved-goal column names."""
    import pandas as pd

    achieved_columns = [f"achieved_{d}" for d in range(achieved.shape[1])]
    frame = pd.DataFrame(
        {
            "episode_id": steps.column("episode_id").to_numpy(),
            "reward": steps.column("reward").to_numpy(),
            **{name: achieved[:, d] for d, name in enumerate(achieved_columns)},
        }
    )
    return frame, achieved_columns


def pandas_goals(achieved_columns: list[str], rng: np.random.Generator) -> Callable:
    """The per-episode function of the `goals` baseline (future, k=K): k future goals per
    step with their source step, reward and reached flag, NumPy inside each episode."""
    import pandas as pd

    def goals(episode: pd.DataFrame) -> pd.DataFrame:
        goal_source = episode[achieved_columns].to_numpy()
        length = len(goal_source)
        t = np.arange(length)
        low = np.minimum(t + 1, length - 1)
        after = goal_source[low]  # the achieved goal after each step
        out = {}
        for j in range(K):
            rows = low + (rng.random(length) * (length - low)).astype(np.int64)
            goal = goal_source[rows]
            reached = ((goal - after) ** 2).sum(axis=1) <= THRESHOLD**2
            for d in range(goal.shape[1]):
                out[f"goal_{j}_{d}"] = goal[:, d]
            out[f"goal_step_{j}"] = rows.astype(np.int32)
            out[f"reward_{j}"] = reached.astype(np.float32)
            out[f"reached_{j}"] = reached
        return pd.DataFrame(out, index=episode.index)

    return goals


def pandas_baselines(
    steps: pa.Table, achieved: np.ndarray, seed: int
) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of three groupby-applies over episodes: the columns of
    `returns`, the columns of `goals` (future, k=K), and the issue's reference
    (return-to-go plus one future goal index)."""
    import pandas as pd

    frame, achieved_columns = pandas_frame(steps, achieved)
    rng = np.random.default_rng(seed)

    def returns(episode: pd.DataFrame) -> pd.DataFrame:
        rewards = episode["reward"].to_numpy()
        return pd.DataFrame(
            {"return_to_go": _return_to_go(rewards), "episode_return": rewards.sum()},
            index=episode.index,
        )

    def reference(episode: pd.DataFrame) -> pd.DataFrame:
        rtg = _return_to_go(episode["reward"].to_numpy())
        t = np.arange(len(rtg))
        low = np.minimum(t + 1, len(rtg) - 1)
        future = low + (rng.random(len(rtg)) * (len(rtg) - low)).astype(np.int64)
        return pd.DataFrame({"return_to_go": rtg, "future_goal_step": future})

    goals = pandas_goals(achieved_columns, rng)
    return {
        "returns": _pandas_seconds(frame, ["reward"], returns),
        "goals_future_k4": _pandas_seconds(frame, achieved_columns, goals),
        "issue_reference": _pandas_seconds(frame, ["reward"], reference),
    }


def kernel_seconds(relabeler, steps: pa.Table, episodes: pa.Table, repeats: int = 3) -> float:
    """The best of `repeats` runs of `relabeler.relabel` on one part (after its setup)."""
    from relabelers.base import Part, TableInputs

    relabeler.setup(TableInputs(steps, episodes))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        relabeler.relabel(steps, episodes, Part(0, 1))
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------- whole jobs


def run_job(input_uri: str, output_uri: str, relabeler: str) -> dict:
    from jobs.commands.relabel import Relabel

    shutil.rmtree(output_uri, ignore_errors=True)
    with TreeMemory() as memory:
        start, start_cpu = time.perf_counter(), memory.cpu_seconds()
        manifest = Relabel(input=input_uri, output=output_uri, relabelers=[relabeler]).run()
        seconds = time.perf_counter() - start
        cpu_seconds = memory.cpu_seconds() - start_cpu
    written = sum(
        f.bytes
        for g in manifest.groups
        if not g.inherited
        for f in g.steps_files + g.episodes_files
    )
    return {
        "seconds": round(seconds, 3),
        "steps_per_s": round(manifest.steps / seconds),
        # CPU seconds of the whole process tree (driver, Ray's processes and workers):
        # per core, the job's cost as other load on the machine leaves it.
        "cpu_seconds": round(cpu_seconds, 2),
        "steps_per_cpu_s": round(manifest.steps / cpu_seconds),
        "bytes_written": written,
        "peak_rss_largest_process_mb": round(memory.peak_single / 2**20),
        "peak_rss_process_tree_mb": round(memory.peak_tree / 2**20),
    }


# ---------------------------------------------------------------- main


def _noop(task: int) -> dict:
    return {"steps": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20_000_000, help="dataset size (steps)")
    parser.add_argument("--episode-length", type=int, default=1000)
    parser.add_argument("--part-steps", type=int, default=1_000_000)
    parser.add_argument("--pandas-steps", type=int, default=500_000, help="pandas subset")
    parser.add_argument("--workdir", default=None, help="where datasets go (default: a temp dir)")
    parser.add_argument("--out", default="bench/results/relabel.json")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hs-bench-relabel-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TMPDIR", str(workdir / "ray"))
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)

    from relabelers.goals import GoalsRelabeler
    from relabelers.returns import ReturnsRelabeler

    length = args.episode_length
    results: dict = {
        "config": {
            "steps": args.steps,
            "episode_length": length,
            "obs_dim": OBS_DIM,
            "action_dim": ACTION_DIM,
            "part_steps": args.part_steps,
            "gamma": GAMMA,
            "goals": f"future, k={K}, achieved=observation[0:3]",
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
        }
    }

    # 1-3: kernels, ceiling and pandas on one part in memory.
    part_steps = min(args.part_steps, args.steps) // length * length
    steps, episodes = part_tables(0, part_steps // length, length, seed=0)
    rewards = steps.column("reward").to_numpy()
    from schemas import steps as cols

    achieved = cols.arrow_to_numpy(steps.column("observation"))[:, GOAL_SLICE]
    returns_kernel = kernel_seconds(ReturnsRelabeler({"gamma": GAMMA}), steps, episodes)
    goals_kernel = kernel_seconds(
        GoalsRelabeler({"strategy": "future", "k": K, "achieved": "observation[0:3]"}),
        steps,
        episodes,
    )
    ceiling = min(numpy_ceiling(rewards, achieved, length, seed) for seed in range(3))
    pandas_rows = min(args.pandas_steps, part_steps)
    pandas_seconds = pandas_baselines(steps.slice(0, pandas_rows), achieved[:pandas_rows], seed=0)
    n = steps.num_rows
    results["kernel"] = {
        "steps": n,
        "returns_steps_per_s": round(n / returns_kernel),
        "goals_future_k4_steps_per_s": round(n / goals_kernel),
        "returns_plus_goals_steps_per_s": round(n / (returns_kernel + goals_kernel)),
        "numpy_ceiling_steps_per_s": round(n / ceiling),
        "pandas_groupby_apply_steps_per_s": {
            name: round(pandas_rows / wall) for name, (wall, _) in pandas_seconds.items()
        },
        "pandas_groupby_apply_steps_per_cpu_s": {
            name: round(pandas_rows / cpu) for name, (_, cpu) in pandas_seconds.items()
        },
        "pandas_steps": pandas_rows,
    }
    results["kernel"]["kernel_vs_ceiling"] = round(
        (returns_kernel + goals_kernel) / ceiling, 2
    )  # < 2 is the goal

    # 4: whole jobs at the full size and at a quarter of it.
    from jobs.runtime import RayExecutor, init_ray

    # Start-up: Ray itself plus the first tasks (worker processes).
    start = time.perf_counter()
    init_ray()
    RayExecutor().map(_noop, list(range(4)), description="warm-up")
    results["ray_startup_seconds"] = round(time.perf_counter() - start, 2)
    pandas_rates = results["kernel"]["pandas_groupby_apply_steps_per_s"]
    pandas_cpu_rates = results["kernel"]["pandas_groupby_apply_steps_per_cpu_s"]
    for label, size in (("quarter", args.steps // 4), ("full", args.steps)):
        data = str(workdir / f"data-{label}")
        shutil.rmtree(data, ignore_errors=True)
        start = time.perf_counter()
        write_bench_dataset(data, size, length, args.part_steps)
        jobs = {"write_dataset_seconds": round(time.perf_counter() - start, 2)}
        for name, spec in (
            ("returns", f"returns:gamma={GAMMA}"),
            ("goals_future_k4", f"goals:strategy=future,k={K},achieved=observation[0:3]"),
        ):
            jobs[name] = run_job(data, str(workdir / f"out-{label}-{name}"), spec)
            # Against pandas computing the same columns, and the reference.
            jobs[name]["vs_pandas"] = round(jobs[name]["steps_per_s"] / pandas_rates[name], 1)
            # The job runs on every CPU, pandas on one.
            jobs[name]["vs_pandas_per_core"] = round(
                jobs[name]["steps_per_s"] / (os.cpu_count() or 1) / pandas_rates[name], 2
            )
            jobs[name]["vs_pandas_per_cpu_second"] = round(
                jobs[name]["steps_per_cpu_s"] / pandas_cpu_rates[name], 2
            )
            jobs[name]["vs_pandas_issue_reference"] = round(
                jobs[name]["steps_per_s"] / pandas_rates["issue_reference"], 1
            )
        results[f"job_{label}"] = {"steps": size, **jobs}
        shutil.rmtree(data, ignore_errors=True)
        for name in ("returns", "goals_future_k4"):
            shutil.rmtree(workdir / f"out-{label}-{name}", ignore_errors=True)

    results["load_average_1min"] = round(os.getloadavg()[0], 1)
    save_results(results, args.out)


if __name__ == "__main__":
    main()
