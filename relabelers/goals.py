"""`goals`: hindsight experience replay (HER) goal relabeling.

For every step, `k` goals are drawn from goals that were actually achieved:

- `final`:   the achieved goal at the last step of the same episode;
- `future`:  the achieved goal at a uniformly drawn later step t' in [t + 1, T - 1] of the
             same episode (t' = T - 1 at the last step);
- `episode`: the achieved goal at a uniformly drawn step t' in [0, T - 1] of the episode;
- `random`:  the achieved goal of a step of another episode, from a dataset-wide pool built
             in `setup` (bottom-k by a hash of the episode id, so it does not depend on
             how the dataset is split into parts).

The achieved-goal source (`achieved`) is a column (`achieved_goal`), a struct field
(`observation.achieved_goal`) or a slice of a vector column (`observation[0:2]`,
`observation.observation[3:5]`): see schemas/goals.py, which also derives every column
below from the goal steps (one derivation for both layouts).

Columns written (step level), with G = goal_dim, every item non-null:

- `hindsight_goal`:      FixedSizeList<FixedSizeList<float32>[G]>[k]: each step's k goals
                         as a [k, G] array (Polars: Array(Float32, shape=(k, G)), goal j
                         is `pl.col("hindsight_goal").arr.get(j)`; `.to_numpy()` is
                         (steps, k, G));
- `hindsight_goal_step`: FixedSizeList<int32>[k]: the step t' each goal came from (the whole
                         entry is null for `random`, whose goals come from other episodes);
- `hindsight_reward`:    FixedSizeList<float32>[k]: the relabeled reward under each goal;
- `hindsight_reached`:   FixedSizeList<bool>[k]: whether the goal is reached after the step.

"Reached after step t" compares the goal with the achieved goal of the state after the
action, as Stable-Baselines3's and TorchRL's HER do: the achieved goal at row t + 1 of the
same episode; at the last step, the same field or slice of the stored `next_observation`
(the state the episode ended in) when achieved goals come from `observation` and the
dataset has next observations, else the last row's own achieved goal (the final next
state is then nowhere in the table). Reached means Euclidean distance <= `threshold`; the
reward is 1.0 / 0.0 for reached / not, or, with `reward_function`, whatever that function
returns for (achieved, goal):

- a gymnasium environment id (`hindsight/PointGoal-v0`, or `module:Env-v0` to import the
  module that registers it): its `compute_reward(achieved_goal, desired_goal, info)`;
- a dotted path `package.module:function` taking (achieved_goal, desired_goal, info).

`store=steps` writes `hindsight_goal_step` only (the draws are the same): hindsight's
readers (engine/derived.py) derive `hindsight_goal`, `hindsight_reward` and
`hindsight_reached` when they are asked for, from the achieved goals of whole episodes. It
refuses `random` (goals of other episodes have no step here) and `reward_function` (a
reader would have to import user code).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from relabelers.base import (
    Columns,
    Inputs,
    Output,
    Params,
    Part,
    Relabeler,
    RelabelError,
    hash_uniform,
    splitmix64,
)
from schemas import steps as cols
from schemas.goals import (
    CHUNK_ROWS,
    HINDSIGHT_GOAL,
    HINDSIGHT_GOAL_STEP,
    HINDSIGHT_REACHED,
    HINDSIGHT_REWARD,
    AchievedSpec,
    GoalsError,
    achieved_after_step,
    compare_goals,
    derive_goals,
    fixed_lists,
    list_type,
)

# hash_uniform streams, so different uses of randomness never correlate.
_STREAM_GOAL = 1_000
_STREAM_POOL = 7


def step_uniforms(
    seed: int, episode_ids: np.ndarray, t: np.ndarray, bounds: np.ndarray, stream: int
) -> np.ndarray:
    """Exactly `hash_uniform(seed, episode_ids, t, stream)` for a sorted step column, about
    twice as fast: the episode-level half of the hash is computed once per episode."""
    draws = GoalDraws(seed, episode_ids, t, bounds, (stream,))
    return draws.uniforms(slice(0, len(t)))[0]


class GoalDraws:
    """`hash_uniform(seed, episode_id, t, stream)` of every step for several streams, drawn
    for a slice of rows at a time (so the kernel works in cache-sized chunks): the
    episode-level half of the hash is computed once per episode and stream."""

    def __init__(
        self,
        seed: int,
        episode_ids: np.ndarray,
        t: np.ndarray,
        bounds: np.ndarray,
        streams: Sequence[int],
    ):
        starts, lengths = bounds[:-1], np.diff(bounds)
        with np.errstate(over="ignore"):
            keys = splitmix64(
                np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
                ^ (np.asarray(streams, np.uint64) * np.uint64(0x632BE59BD9B4E019))
            )
            ids = episode_ids[starts].astype(np.uint64)
            self.episode_keys = splitmix64(keys[:, None] ^ ids[None, :])  # (streams, episodes)
        self.episode_of_row = np.repeat(np.arange(len(starts)), lengths)
        self.t = t.astype(np.uint64)

    def uniforms(self, rows: slice) -> np.ndarray:
        """(streams, rows) uniforms in [0, 1) for the steps `rows`."""
        x = self.episode_keys[:, self.episode_of_row[rows]]
        x ^= self.t[rows]
        scratch = np.empty_like(x)
        x += np.uint64(0x9E3779B97F4A7C15)  # splitmix64, in place (uint64 wraps around)
        for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(x, np.uint64(shift), out=scratch)
            x ^= scratch
            x *= np.uint64(multiplier)
        np.right_shift(x, np.uint64(31), out=scratch)
        x ^= scratch
        x >>= np.uint64(11)
        uniform = x.astype(np.float64)
        uniform *= 1.0 / (1 << 53)
        return uniform


@functools.lru_cache(maxsize=16)
def resolve_reward_function(name: str) -> Callable[[np.ndarray, np.ndarray, Any], np.ndarray]:
    """A batched reward function (achieved_goal, desired_goal, info) -> reward from a
    gymnasium env id (`[module:]ns/Env-v0`) or a dotted path (`package.module:function`).
    Kept per process: every part a worker runs uses the same environment."""
    module_name, sep, attribute = name.rpartition(":")
    if sep and "/" not in attribute and "-v" not in attribute:
        try:
            module = importlib.import_module(module_name)
            function = getattr(module, attribute)
        except (ImportError, AttributeError) as error:
            raise RelabelError(
                f"relabeler 'goals': reward_function={name!r} could not be loaded: {error}"
            ) from None
        if not callable(function):
            raise RelabelError(f"relabeler 'goals': reward_function={name!r} is not callable")
        return function
    import gymnasium

    env_id = attribute if sep else name
    if sep:
        try:
            importlib.import_module(module_name)
        except ImportError as error:
            raise RelabelError(
                f"relabeler 'goals': reward_function={name!r}: cannot import {module_name!r}: {error}"
            ) from None
    if env_id not in gymnasium.registry:
        raise RelabelError(
            f"relabeler 'goals': reward_function={name!r}: no gymnasium environment {env_id!r} is "
            "registered; write `module:Env-v0` to import the module that registers it, or give "
            "a function as `package.module:function`"
        )
    env = gymnasium.make(env_id).unwrapped
    if not hasattr(env, "compute_reward"):
        raise RelabelError(
            f"relabeler 'goals': environment {env_id!r} has no compute_reward(achieved_goal, "
            "desired_goal, info) method"
        )
    return env.compute_reward


class GoalsParams(Params):
    strategy: Literal["final", "future", "episode", "random"] = Field(
        "future", description="Where hindsight goals come from (HER strategies)."
    )
    k: int = Field(4, ge=1, le=64, description="Goals per step.")
    achieved: str = Field(
        "observation.achieved_goal",
        description="Achieved-goal source: a column, a struct field or a slice (observation[0:2]).",
    )
    threshold: float = Field(
        0.05, gt=0.0, description="A goal is reached within this Euclidean distance."
    )
    reward_function: str | None = Field(
        None,
        description="Gymnasium env id with compute_reward ([module:]ns/Env-v0) or "
        "package.module:function; default: 1.0 reached / 0.0 not.",
    )
    pool_size: int = Field(
        4096, ge=2, description="Goals kept in the dataset-wide pool for strategy=random."
    )
    store: Literal["vectors", "steps"] = Field(
        "vectors",
        description="vectors: write goal vectors, goal steps, rewards and flags; steps: write "
        "the goal steps only, hindsight's readers derive the rest when asked for them.",
    )


class GoalsRelabeler(Relabeler):
    """Hindsight goals per step (HER final/future/episode/random) and their rewards."""

    name = "goals"
    # 1.3: `store=steps` writes the goal steps only (readers derive the other columns);
    # `store=vectors` (the default) writes what 1.2 wrote, the same numbers.
    # 1.2: goals stored as [k, G] (nested fixed-size lists) with non-null items; 1.1 stored
    # them flat, FixedSizeList<float32>[k*G] (the same numbers, goal j at [j*G, (j+1)*G)).
    # 1.1: the last step's goal is reached by the stored next observation's achieved goal
    # (1.0 compared it with the last row's own, so a final goal was always reached there).
    version = "1.3"
    Params = GoalsParams

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        with _relabel_errors():
            self.achieved = AchievedSpec.parse(self.params.achieved)
        if self.params.store == "steps":
            if self.params.strategy == "random":
                raise RelabelError(
                    "relabeler 'goals': store=steps cannot hold strategy=random, whose goals "
                    "come from other episodes (no goal step of this episode names them); use "
                    "store=vectors"
                )
            if self.params.reward_function:
                raise RelabelError(
                    "relabeler 'goals': store=steps cannot use reward_function, which readers "
                    "would have to import (user code) to derive rewards; use store=vectors, "
                    "or store=steps with the default reward (1 reached / 0 not)"
                )
        # Where the state after the last step is, when the dataset stores next observations.
        self.achieved_next = self.achieved.after_step()
        # Set by `setup` for strategy=random: the dataset-wide goal pool, one goal per episode.
        self.pool_episode_ids: np.ndarray | None = None
        self.pool_goals: np.ndarray | None = None

    def reads(self) -> Columns:
        if self.params.store == "steps":  # the achieved goals are read by whoever derives
            return Columns(steps=(cols.EPISODE_ID, cols.T), steps_schema=(self.achieved.path,))
        return Columns(
            steps=(cols.EPISODE_ID, cols.T, self.achieved.path),
            steps_if_present=(self.achieved_next.path,) if self.achieved_next else (),
        )

    def writes(self) -> Columns:
        if self.params.store == "steps":
            return Columns(steps=(HINDSIGHT_GOAL_STEP,))
        return Columns(
            steps=(HINDSIGHT_GOAL, HINDSIGHT_GOAL_STEP, HINDSIGHT_REWARD, HINDSIGHT_REACHED)
        )

    def setup(self, inputs: Inputs) -> None:
        """The achieved-goal spec must fit the schema (with store=steps too: readers will
        derive from it) and the reward function load; for strategy=random, one pass builds
        the goal pool."""
        with _relabel_errors():
            goal_dim = self.achieved.goal_dim(inputs.steps_schema)
            next_spec = self.achieved_next
            if next_spec and next_spec.column in inputs.steps_schema.names:
                if next_spec.goal_dim(inputs.steps_schema) != goal_dim:
                    raise RelabelError(
                        f"relabeler 'goals': {next_spec} has another size than {self.achieved}; "
                        "next_observation must have the layout of observation"
                    )
        if self.params.reward_function:
            resolve_reward_function(self.params.reward_function)
        if self.params.strategy == "random":
            self.pool_episode_ids, self.pool_goals = merge_pools(
                inputs.summarize(self.part_pool), self.params.pool_size
            )

    def finish(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        if self.pool_episode_ids is None:
            return {}
        return {"pool_size": int(len(self.pool_episode_ids))}

    # ------------------------------------------------------------ the pool (random only)

    def part_pool(self, steps: pa.Table, episodes: pa.Table, part: Part) -> dict[str, np.ndarray]:
        """One achieved goal per episode, keeping the `pool_size` smallest hashes."""
        episode_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
        t = cols.arrow_to_numpy(steps.column(cols.T))
        with _relabel_errors():
            achieved = self.achieved.read_finite(steps, episode_ids, t)
        bounds = cols.episode_boundaries(episode_ids)
        starts, lengths = bounds[:-1], np.diff(bounds)
        ids = episode_ids[starts]
        rows = starts + np.minimum(
            (hash_uniform(self.seed, ids, 0, _STREAM_POOL + 1) * lengths).astype(np.int64),
            lengths - 1,
        )
        keys = hash_uniform(self.seed, ids, 0, _STREAM_POOL)
        keep = np.argsort(keys, kind="stable")[: self.params.pool_size]
        return {"keys": keys[keep], "episode_ids": ids[keep], "goals": achieved[rows[keep]]}

    # ------------------------------------------------------------ per part

    def source_rows(
        self,
        rows: slice,
        uniform: np.ndarray | None,
        bounds: np.ndarray,
        episode_of_row: np.ndarray,
    ) -> np.ndarray:
        """Row (within the part) of the step each of the k goals of `rows` comes from:
        (k, rows), from the uniforms of those rows (k, rows)."""
        episode = episode_of_row[rows]
        last = bounds[1:][episode] - 1  # row of the episode's last step
        if self.params.strategy == "final":
            return np.broadcast_to(last, (self.params.k, len(last)))
        if self.params.strategy == "episode":
            low = bounds[:-1][episode]
        else:  # future: t' in [t + 1, T - 1], or T - 1 at the last step
            low = np.minimum(np.arange(rows.start + 1, rows.stop + 1), last)
        span = last - low + 1
        offset = (uniform * span).astype(np.int64)
        np.minimum(offset, span - 1, out=offset)  # u * span may round up to span
        offset += low
        return offset

    def goal_rows(self, episode_ids: np.ndarray, t: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """The row (within the part) each of the k goals of every row comes from (n, k)
        (final, future, episode); their steps `t[rows]` are what both layouts store."""
        n, k = len(t), self.params.k
        draws = GoalDraws(self.seed, episode_ids, t, bounds, range(_STREAM_GOAL, _STREAM_GOAL + k))
        rows_out = np.empty((n, k), dtype=np.int64)
        for start in range(0, n, CHUNK_ROWS):
            rows = slice(start, min(start + CHUNK_ROWS, n))
            uniform = None if self.params.strategy == "final" else draws.uniforms(rows)
            rows_out[rows] = self.source_rows(rows, uniform, bounds, draws.episode_of_row).T
        return rows_out

    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        with _relabel_errors():
            return self._relabel(steps, part)

    def _relabel(self, steps: pa.Table, part: Part) -> Output:
        episode_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
        t = cols.arrow_to_numpy(steps.column(cols.T))
        bounds = cols.episode_boundaries(episode_ids)
        strategy = self.params.strategy
        if self.params.store == "steps":
            goal_steps = t[self.goal_rows(episode_ids, t, bounds)].astype(np.int32)
            return Output(steps=pa.table({HINDSIGHT_GOAL_STEP: fixed_lists(goal_steps)}))
        achieved = self.achieved.read_finite(steps, episode_ids, t)
        n, goal_dim, k = len(episode_ids), achieved.shape[1], self.params.k
        achieved_after = achieved_after_step(steps, achieved, bounds, self.achieved_next)
        if strategy == "random":
            if self.pool_episode_ids is None or self.pool_goals is None:
                raise RelabelError(
                    f"{part}: relabeler 'goals' with strategy=random needs the goal pool from "
                    "setup(); for tables in memory use relabelers.base.relabel_tables"
                )
            if self.pool_goals.shape[1] != goal_dim:
                raise RelabelError("relabeler 'goals': the random-goal pool has another goal_dim")
            draws = GoalDraws(
                self.seed, episode_ids, t, bounds, range(_STREAM_GOAL, _STREAM_GOAL + k)
            )

            def from_pool(rows: slice, out: np.ndarray) -> None:
                picks = self._pool_picks(draws.uniforms(rows), rows, episode_ids)
                _take_rows(self.pool_goals, np.ascontiguousarray(picks.T), out=out)

            goals, reached = compare_goals(k, achieved_after, self.params.threshold, from_pool)
            goal_steps = None
        else:
            # The derivation every reader of a store=steps group runs: one code path.
            rows = self.goal_rows(episode_ids, t, bounds)
            goal_steps = t[rows].astype(np.int32)
            goals, reached = derive_goals(
                achieved, achieved_after, t, bounds, goal_steps, self.params.threshold,
                str(part), rows=rows,  # the rows just drawn: no need to find them from t
            )  # fmt: skip
        if self.params.reward_function:
            reward_function = resolve_reward_function(self.params.reward_function)
            reward = np.asarray(
                reward_function(
                    np.repeat(achieved_after, k, axis=0), goals.reshape(n * k, goal_dim), None
                ),
                dtype=np.float32,
            ).reshape(n, k)
        else:
            reward = reached.astype(np.float32)
        return Output(steps=goal_table(goals, goal_steps, reward, reached))

    def _pool_picks(self, uniform: np.ndarray, rows: slice, episode_ids: np.ndarray) -> np.ndarray:
        """Pool entries for strategy=random (k, rows); a pick from the step's own episode
        moves to the next entry (the pool holds one goal per episode: another episode)."""
        pool_ids = self.pool_episode_ids
        picks = np.minimum((uniform * len(pool_ids)).astype(np.int64), len(pool_ids) - 1)
        same = pool_ids[picks] == episode_ids[rows]
        return np.where(same, (picks + 1) % len(pool_ids), picks)


@contextlib.contextmanager
def _relabel_errors() -> Iterator[None]:
    """Goals that cannot be derived (schemas/goals.py) are this relabeler's errors."""
    try:
        yield
    except GoalsError as error:
        raise RelabelError(str(error)) from None


def merge_pools(
    summaries: list[dict[str, np.ndarray]], pool_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The dataset-wide pool from every part's: (episode ids, goals as float32 rows)."""
    keys = np.concatenate([np.asarray(s["keys"], dtype=np.float64) for s in summaries])
    ids = np.concatenate([np.asarray(s["episode_ids"], dtype=np.int64) for s in summaries])
    goals = np.concatenate([np.asarray(s["goals"], dtype=np.float32) for s in summaries])
    if len(np.unique(ids)) < 2:
        raise RelabelError(
            "relabeler 'goals': strategy=random draws goals from other episodes, "
            "but the dataset has fewer than two episodes"
        )
    # Order by (hash, episode id): the same pool whatever the partitioning.
    order = np.lexsort((ids, keys))[:pool_size]
    return ids[order], goals[order].reshape(len(order), -1)


def _take_rows(values: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[...] = values[rows] for (n, G) float32 values and out of shape (*rows.shape, G),
    moving each row as one G*4-byte item (several times faster than fancy indexing)."""
    row_type = np.dtype((np.void, values.shape[1] * values.itemsize))
    items = np.ascontiguousarray(values).view(row_type).reshape(-1)
    np.take(items, rows, out=out.view(row_type).reshape(rows.shape))


def goal_table(
    goals: np.ndarray, goal_steps: np.ndarray | None, reward: np.ndarray, reached: np.ndarray
) -> pa.Table:
    """The four step columns from (n, k, G) goals and (n, k) goal steps (None: null
    entries), rewards and flags, as nested fixed-size lists of non-null items."""
    n, k = reached.shape
    if goal_steps is None:
        steps = pa.nulls(n, type=list_type(pa.int32(), k))
    else:
        steps = fixed_lists(goal_steps)
    return pa.table(
        {
            HINDSIGHT_GOAL: fixed_lists(goals),
            HINDSIGHT_GOAL_STEP: steps,
            HINDSIGHT_REWARD: fixed_lists(reward),
            HINDSIGHT_REACHED: fixed_lists(reached),
        }
    )
