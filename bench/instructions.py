"""`instructions` relabel throughput against a pandas groupby-apply computing the same thing.

    python -m bench.instructions --out bench/results/instructions.json [--steps 250000]

Data: a MiniGrid-layout dataset (`observation` / `next_observation` structs holding the
encoded 7x7x3 view as 147 uint8, episodes of 8..64 steps, ~`--part-steps` steps a part):
empty rooms in which an object (key, ball, box, door, or a wall or goal, which are no
instruction) comes into the cell in front of the agent on ~4% of steps, and an object is
picked up at a random step of ~30% of episodes. Measured in this process on the same data,
each the best of `--repeats`, alternated:

1. `relabel_tables`: the relabeler's setup / relabel / finish on the whole tables in memory
   (decode the two cells of every row, first hit per episode, the three columns);
2. the job (`jobs.relabeling.relabel` with the in-process executor, as `hindsight relabel`
   runs each part: read the columns it reads, relabel, write the group's Parquet part,
   commit a new version), without Ray's start-up; and its reads alone (`job_reads_only`:
   the two 147-byte views of every step, most of the job's time);
3. pandas: a DataFrame of the decoded cells (decoding by NumPy not timed: a head start) and
   `groupby("episode_id").apply` of a function that finds each episode's first
   instruction and step with NumPy inside the episode: what a user writes today.

The results say steps/s of each and the ratios against pandas (`job_vs_read_then_pandas`:
pandas also has to read the columns), with the machine's load
(a shared 2-core machine: CPU seconds are given too) and a check that pandas and the
relabeler agree on every episode.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench import best_of, save_results

MIN_LENGTH, MAX_LENGTH = 8, 64
FRONT_OFFSET = (3 * 7 + 5) * 3  # image[3, 5]
OWN_OFFSET = (3 * 7 + 6) * 3  # image[3, 6]


def views(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` empty-room views (147 uint8 each): floor, and a wall along the far side."""
    from relabelers.instructions import OBJECT_TO_IDX

    image = np.zeros((count, 7, 7, 3), np.uint8)
    image[..., 0] = OBJECT_TO_IDX["empty"]
    image[:, :, 0, 0] = OBJECT_TO_IDX["wall"]
    return image.reshape(count, 147)


def minigrid_tables(steps: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """Steps and episodes in the MiniGrid layout, about `steps` steps (vectorised)."""
    from relabelers.instructions import OBJECT_TO_IDX
    from schemas import steps as cols

    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=steps // 36 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), steps) + 1]
    episodes, total = len(lengths), int(lengths.sum())
    # Views 0..length of each episode: observation t is view t, next_observation view t + 1.
    view_lengths = lengths + 1
    image = views(int(view_lengths.sum()), rng)
    objects = np.array([OBJECT_TO_IDX[o] for o in ("key", "ball", "box", "door", "wall", "goal")])
    front = rng.random(len(image)) < 0.04
    image[front, FRONT_OFFSET] = rng.choice(objects, int(front.sum()))
    image[front, FRONT_OFFSET + 1] = rng.integers(0, 6, int(front.sum()))
    view_start = np.concatenate([[0], np.cumsum(view_lengths)[:-1]])
    carries = rng.random(episodes) < 0.3
    picked = view_start + (rng.random(episodes) * view_lengths).astype(np.int64)
    episode_of_view = np.repeat(np.arange(episodes), view_lengths)
    carrying = carries[episode_of_view] & (np.arange(len(image)) >= picked[episode_of_view])
    held = rng.choice(objects[:3], episodes)[episode_of_view]
    image[carrying, OWN_OFFSET] = held[carrying]
    image[carrying, OWN_OFFSET + 1] = rng.integers(0, 6, episodes)[episode_of_view][carrying]
    last_view = np.cumsum(view_lengths) - 1
    is_obs = np.ones(len(image), bool)
    is_obs[last_view] = False
    is_next = np.ones(len(image), bool)
    is_next[view_start] = False

    def struct(rows: np.ndarray) -> pa.StructArray:
        flat = pa.FixedSizeListArray.from_arrays(pa.array(image[rows].reshape(-1)), 147)
        return pa.StructArray.from_arrays(
            [flat, pa.array(np.zeros(total, np.int64))], names=["image", "direction"]
        )

    ids = np.repeat(np.arange(episodes, dtype=np.int64), lengths)
    t = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    step_table = pa.table(
        {
            cols.EPISODE_ID: ids,
            cols.T: t.astype(np.int64),
            cols.OBSERVATION: struct(is_obs),
            cols.ACTION: rng.integers(0, 7, total),
            cols.REWARD: np.zeros(total),
            cols.TERMINATED: np.zeros(total, bool),
            cols.TRUNCATED: np.zeros(total, bool),
            cols.NEXT_OBSERVATION: struct(is_next),
        }
    )
    episode_table = pa.table(
        {
            cols.EPISODE_ID: np.arange(episodes, dtype=np.int64),
            cols.LENGTH: lengths.astype(np.int64),
            cols.RETURN: np.zeros(episodes),
            cols.ENV_ID: pa.array(["BabyAI-GoToLocal-v0"] * episodes),
            "mission": pa.array(["go to the red key"] * episodes),
        }
    )
    return step_table, episode_table


def pandas_instructions(steps: pa.Table) -> Callable[[], object]:
    """pandas groupby-apply over episodes computing (instruction, step) per episode, from a
    frame of the decoded cells (built here, not timed)."""
    import pandas as pd

    from relabelers.instructions import COLOR_NAMES, OBJECT_TO_IDX
    from schemas import steps as cols

    after = cols.arrow_to_numpy(steps.column("next_observation").combine_chunks().field("image"))
    before = cols.arrow_to_numpy(steps.column("observation").combine_chunks().field("image"))
    frame = pd.DataFrame(
        {
            "episode_id": steps.column(cols.EPISODE_ID).to_numpy(),
            "t": steps.column(cols.T).to_numpy(),
            "front_obj": after[:, FRONT_OFFSET],
            "front_color": after[:, FRONT_OFFSET + 1],
            "own_obj": after[:, OWN_OFFSET],
            "own_color": after[:, OWN_OFFSET + 1],
            "before_obj": before[:, OWN_OFFSET],
            "before_color": before[:, OWN_OFFSET + 1],
        }
    )
    names = {v: k for k, v in OBJECT_TO_IDX.items()}
    goto = [OBJECT_TO_IDX[o] for o in ("key", "ball", "box", "door")]
    carriable = [OBJECT_TO_IDX[o] for o in ("key", "ball", "box")]

    def first(episode: pd.DataFrame) -> tuple[str | None, int | None]:
        front, own = episode["front_obj"].to_numpy(), episode["own_obj"].to_numpy()
        own_color = episode["own_color"].to_numpy()
        goto_hit = np.isin(front, goto)
        pickup_hit = np.isin(own, carriable) & (
            (episode["before_obj"].to_numpy() != own)
            | (episode["before_color"].to_numpy() != own_color)
        )
        hit = goto_hit | pickup_hit
        if not hit.any():
            return None, None
        i = int(np.argmax(hit))
        if goto_hit[i]:
            color = COLOR_NAMES[episode["front_color"].to_numpy()[i]]
            return f"go to the {color} {names[front[i]]}", int(episode["t"].to_numpy()[i])
        return f"pick up the {COLOR_NAMES[own_color[i]]} {names[own[i]]}", int(
            episode["t"].to_numpy()[i]
        )

    columns = [c for c in frame.columns if c != "episode_id"]
    return lambda: frame.groupby("episode_id", sort=False)[columns].apply(first)


def main(argv: list[str] | None = None) -> dict:
    from engine.executor import InProcess
    from engine.parts import write_dataset
    from jobs import relabeling
    from relabelers.base import relabel_tables
    from relabelers.instructions import InstructionsRelabeler

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/instructions.json")
    parser.add_argument("--steps", type=int, default=250_000)
    parser.add_argument("--part-steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    steps, episodes = minigrid_tables(args.steps, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    try:
        data = str(workdir / "babyai")
        write_dataset(
            data, steps, episodes, operation="ingest", command="bench", part_steps=args.part_steps
        )
        runs = iter(range(10**6))

        def job() -> None:
            out = str(workdir / f"out-{next(runs)}")
            relabelers = [InstructionsRelabeler({})]
            relabeling.relabel(data, out, relabelers, executor=InProcess(), command="bench")
            shutil.rmtree(out)

        from engine.dataset import open_dataset
        from jobs.relabeling import PartReader

        reader = PartReader.of(open_dataset(data), InstructionsRelabeler({}))

        def read() -> None:
            for index in range(reader.dataset.num_parts):
                reader.read(reader.part(index))

        in_memory = relabel_tables(InstructionsRelabeler({}), steps, episodes)
        pandas = pandas_instructions(steps)
        answer = pandas()
        got = in_memory.episodes.to_pylist()
        agree = all(
            (row["instruction"], row["instruction_step"]) == tuple(answer.iloc[i])
            for i, row in enumerate(got)
        )
        seconds = best_of(
            args.repeats,
            {
                "relabel_tables": lambda: relabel_tables(
                    InstructionsRelabeler({}), steps, episodes
                ),
                "job_in_process": job,
                "job_reads_only": read,
                "pandas_groupby_apply": pandas,
            },
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    n = steps.num_rows
    rate = {name: round(n / s) for name, s in seconds.items() if not name.endswith("_cpu")}
    results = {
        "benchmark": "instructions",
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "steps": n,
        "episodes": episodes.num_rows,
        "parts": -(-n // args.part_steps),
        "instructed_episodes": in_memory.report["instructed"],
        "by_kind": in_memory.report["by_kind"],
        "pandas_agrees_on_every_episode": agree,
        "seconds_best_of": args.repeats,
        "seconds": seconds,
        "steps_per_second": rate,
        "relabel_tables_vs_pandas": round(rate["relabel_tables"] / rate["pandas_groupby_apply"], 1),
        "job_vs_pandas": round(rate["job_in_process"] / rate["pandas_groupby_apply"], 1),
        # pandas must read the same columns too: the end-to-end comparison.
        "job_vs_read_then_pandas": round(
            (seconds["job_reads_only"] + seconds["pandas_groupby_apply"])
            / seconds["job_in_process"],
            1,
        ),
        "job_vs_pandas_cpu": round(
            seconds["pandas_groupby_apply_cpu"] / seconds["job_in_process_cpu"], 1
        ),
    }
    save_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
