"""Tiny synthetic trajectory data for tests: random episodes as Arrow tables."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from engine.dataset import Dataset, open_dataset
from engine.parts import write_dataset
from engine.writer import (
    VersionWriter,
    assemble_group,
    inherit_groups,
    new_manifest,
)
from schemas import steps as cols
from schemas.manifest import RelabelerInfo


def make_episodes(
    num_episodes: int = 10,
    obs_dim: int = 3,
    action_dim: int = 2,
    seed: int = 0,
    min_length: int = 1,
    max_length: int = 30,
    noise_levels: tuple[float, ...] = (0.0, 0.5, 1.0),
    discrete_actions: int | None = None,
    goal_dim: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Random episodes sorted by (episode_id, t); `noise` is a per-episode info column.

    With `goal_dim`, observations are GoalEnv-style structs (observation, achieved_goal,
    desired_goal).
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, size=num_episodes)
    episode_ids = np.repeat(np.arange(num_episodes, dtype=np.int64) * 10 + 7, lengths)
    t = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    total = int(lengths.sum())
    noise = np.asarray(noise_levels, dtype=np.float32)[np.arange(num_episodes) % len(noise_levels)]
    rewards = rng.normal(size=total).astype(np.float32) - np.repeat(noise, lengths)
    observation = rng.normal(size=(total, obs_dim)).astype(np.float32)
    if discrete_actions:
        action = pa.array(rng.integers(0, discrete_actions, size=total), type=pa.int64())
    else:
        action = cols.vectors_to_arrow(
            rng.uniform(-1, 1, size=(total, action_dim)).astype(np.float32)
        )
    terminated = np.zeros(total, dtype=bool)
    truncated = np.zeros(total, dtype=bool)
    ends = np.cumsum(lengths) - 1
    terminated[ends[::2]] = True
    truncated[ends[1::2]] = True
    if goal_dim:
        obs_column = pa.StructArray.from_arrays(
            [
                cols.vectors_to_arrow(observation),
                cols.vectors_to_arrow(rng.normal(size=(total, goal_dim)).astype(np.float32)),
                cols.vectors_to_arrow(
                    np.repeat(rng.normal(size=(num_episodes, goal_dim)), lengths, axis=0).astype(
                        np.float32
                    )
                ),
            ],
            names=["observation", "achieved_goal", "desired_goal"],
        )
    else:
        obs_column = cols.vectors_to_arrow(observation)
    steps = pa.table(
        {
            cols.EPISODE_ID: episode_ids,
            cols.T: t,
            cols.OBSERVATION: obs_column,
            cols.ACTION: action,
            cols.REWARD: rewards,
            cols.TERMINATED: terminated,
            cols.TRUNCATED: truncated,
            "noise": np.repeat(noise, lengths),
        }
    )
    returns = np.add.reduceat(
        rewards.astype(np.float64), np.concatenate([[0], np.cumsum(lengths)[:-1]])
    )
    episodes = pa.table(
        {
            cols.EPISODE_ID: np.arange(num_episodes, dtype=np.int64) * 10 + 7,
            cols.LENGTH: lengths.astype(np.int64),
            cols.RETURN: returns.astype(np.float32),
            cols.ENV_ID: ["Synthetic-v0"] * num_episodes,
            cols.SOURCE: ["synthetic"] * num_episodes,
            "noise": noise,
        }
    )
    return steps, episodes


def write_synthetic_dataset(
    uri: str, steps: pa.Table, episodes: pa.Table, part_steps: int = 1_000_000
):
    return write_dataset(
        uri,
        steps,
        episodes,
        operation="ingest",
        command="tests.synthetic",
        metadata={"env_id": "Synthetic-v0"},
        part_steps=part_steps,
    )


def attach_group(
    parent_uri: str,
    child_uri: str,
    name: str,
    columns_for_part: Callable[[Dataset, int], tuple[pa.Table | None, pa.Table | None]],
    relabeler: RelabelerInfo | None = None,
    metadata: dict | None = None,
) -> str:
    """Commit a child version of `parent_uri` with one new column group, as a relabeler
    would attach it: `columns_for_part(parent, i)` gives part i's new (steps, episodes)."""
    parent = open_dataset(parent_uri)
    with VersionWriter(child_uri) as writer:
        written = [
            writer.write_part(index, *columns_for_part(parent, index), group=name)
            for index in range(parent.num_parts)
        ]
        group = assemble_group(writer.uri, name, written, relabeler)
        manifest = new_manifest(
            groups=inherit_groups(parent, [group]),
            parts=parent.manifest.parts,
            operation="relabel",
            command="tests.synthetic.attach_group",
            parent=parent,
            metadata=metadata,
        )
        writer.commit(manifest)
    return writer.uri
