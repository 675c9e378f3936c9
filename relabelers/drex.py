"""`drex`: D-REX, a reward learned from rankings of noise-injected rollouts.

Brown et al. (2019), "Better-than-Demonstrator Imitation Learning via Automatically-Ranked
Demonstrations": rollouts of a policy with more injected noise are assumed worse. From
episodes whose noise level is known (`noise_column`, an episode column) we

1. `setup`, one pass over every part (`part_sample`): sample `snippets_per_episode`
   snippets of `snippet_length` steps from each episode, keeping a bounded,
   partition-independent sample (the episodes with the smallest hash of their id, at most
   `max_episodes`);
2. still in `setup`, in the driver (`train_reward`): split episodes by a hash of their id
   into train and held-out, build ranked snippet pairs from episodes of different noise
   (less noise ranked better), and train a small MLP r(observation) with the T-REX /
   Bradley-Terry loss
       -log softmax(sum r(better snippet), sum r(worse snippet));
   the weights stay on the relabeler, which travels to the workers;
3. per part (`relabel`): `drex_reward` per step (the network on each observation, in NumPy
   with a fixed summation order, so identical however the dataset is partitioned) and
   `drex_return` per episode (its sum).

The manifest report holds the held-out pair accuracy (pairs of held-out episodes never
seen in training), and, from every part's output (`finish`), the Spearman rank
correlation of `drex_return` with the true episode return over all episodes and over the
held-out episodes alone.
With `extrapolate=true`, episodes of the least noisy level are kept out of training
entirely; `heldout_best_above_rest` then reports how often such an episode outranks the
training episodes, i.e. whether the learned reward extrapolates beyond what it was shown.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

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
)
from schemas import steps as cols
from schemas.frames import camera_of

DREX_REWARD = "drex_reward"
DREX_RETURN = "drex_return"

_STREAM_SAMPLE = 11
_STREAM_SPLIT = 12
_STREAM_SNIPPET = 13


class DrexParams(Params):
    noise_column: str = Field("noise", description="Episode column with the injected noise level.")
    features: str = Field(
        cols.OBSERVATION,
        description="Step column (or struct field) the reward net reads; a frame column "
        "(frame_<camera>: pixels-only data) is read as its frames, grey, 8x8.",
    )
    snippet_length: int = Field(20, ge=1, description="Steps per training snippet.")
    snippets_per_episode: int = Field(4, ge=1, description="Snippets sampled per episode.")
    max_episodes: int = Field(
        2000, ge=4, description="Episodes sampled for training (bounded, by hash of id)."
    )
    pairs: int = Field(3000, ge=10, description="Ranked training pairs.")
    epochs: int = Field(30, ge=1, description="Passes over the training pairs.")
    hidden: int = Field(32, ge=1, description="Hidden units of the reward MLP.")
    learning_rate: float = Field(3e-3, gt=0, description="Adam learning rate.")
    holdout: float = Field(0.25, gt=0, lt=1, description="Fraction of episodes held out.")
    extrapolate: bool = Field(
        False, description="Keep the least noisy episodes out of training to test extrapolation."
    )


FRAME_FEATURE_SIZE = 8  # frames as features: grey, area-averaged to 8 x 8, in [0, 1]


def frame_features(column: pa.ChunkedArray, name: str, steps: pa.Table) -> np.ndarray:
    """Encoded frames (a frame column: pixels-only data has no state vector) as features
    [n, 64]: each frame decoded, grey, area-averaged to 8 x 8, scaled to [0, 1]. A frame
    decodes on its own, so this is one decode per step, as the loader does."""
    from PIL import Image

    size = (FRAME_FEATURE_SIZE, FRAME_FEATURE_SIZE)
    out = np.empty((len(column), size[0] * size[1]), np.float64)
    for row, data in enumerate(column.to_pylist()):
        try:
            image = Image.open(io.BytesIO(data)).convert("L").resize(size, Image.Resampling.BOX)
        except Exception as error:  # PIL raises many types for damaged data
            episode = steps.column(cols.EPISODE_ID)[row].as_py()
            raise RelabelError(
                f"relabeler 'drex': episode {episode} step t={steps.column(cols.T)[row].as_py()}:"
                f" column {name!r}: frame does not decode ({error})"
            ) from None
        out[row] = np.asarray(image, np.float64).reshape(-1) / 255.0
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    # Average ranks over runs of ties.
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return ranks


def mlp_forward(weights: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """r(x) = w2 . tanh(W1 x + b1) + b2 in float64, summing in a fixed order (no BLAS),
    so a row's reward never depends on which other rows share its batch."""
    w1 = np.asarray(weights["w1"], dtype=np.float64)  # (inputs, hidden)
    b1 = np.asarray(weights["b1"], dtype=np.float64)
    w2 = np.asarray(weights["w2"], dtype=np.float64)  # (hidden,)
    mean = np.asarray(weights["mean"], dtype=np.float64)
    scale = np.asarray(weights["scale"], dtype=np.float64)
    x = (np.asarray(features, dtype=np.float64) - mean) / scale
    hidden = np.broadcast_to(b1, (len(x), len(b1))).copy()
    for i in range(x.shape[1]):
        hidden += x[:, i : i + 1] * w1[i]
    np.tanh(hidden, out=hidden)
    reward = np.full(len(x), float(weights["b2"]))
    for j in range(len(w2)):
        reward += hidden[:, j] * w2[j]
    return reward


@dataclass(frozen=True)
class RewardNet:
    """What `setup` learned: the weights of r(observation) and which episodes it saw."""

    weights: dict[str, Any]
    train_episode_ids: np.ndarray
    heldout_episode_ids: np.ndarray
    best_noise: float
    report: dict[str, Any]


class DrexRelabeler(Relabeler):
    """D-REX reward per step and return per episode, learned from noise rankings."""

    name = "drex"
    version = "1.0"
    Params = DrexParams

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.reward_net: RewardNet | None = None  # set by `setup`

    def reads(self) -> Columns:
        # A frame column (pixels-only data) is declared as frames, read only because asked.
        is_frames = camera_of(self.params.features) is not None
        return Columns(
            steps=(cols.EPISODE_ID, cols.T) + (() if is_frames else (self.params.features,)),
            episodes=(cols.EPISODE_ID, self.params.noise_column),
            # The true return, when the dataset has it, for the rank correlations in the report.
            episodes_if_present=(cols.RETURN,),
            frames=(self.params.features,) if is_frames else (),
        )

    def writes(self) -> Columns:
        return Columns(steps=(DREX_REWARD,), episodes=(DREX_RETURN,))

    def setup(self, inputs: Inputs) -> None:
        """Check the noise column's type, sample snippets from every part, train the net."""
        data_type = inputs.episodes_schema.field(self.params.noise_column).type
        if not (pa.types.is_floating(data_type) or pa.types.is_integer(data_type)):
            raise RelabelError(
                f"relabeler 'drex': noise column {self.params.noise_column!r} is {data_type}; "
                "expected numbers (the injected noise level per episode)"
            )
        self.reward_net = self.train_reward(inputs.summarize(self.part_sample))

    def _features(self, steps: pa.Table) -> np.ndarray:
        column = cols.column_by_path(steps, self.params.features)
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            return frame_features(column, self.params.features, steps)
        values = cols.arrow_to_numpy(column)
        if values.dtype == object:
            raise RelabelError(
                f"relabeler 'drex': features {self.params.features!r} must be a vector or "
                "number column (for a dict observation name a field: observation.observation)"
            )
        values = np.asarray(values, dtype=np.float64)
        values = values[:, None] if values.ndim == 1 else values.reshape(len(values), -1)
        if not np.isfinite(values).all():
            ids = steps.column(cols.EPISODE_ID).to_numpy()
            row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
            raise RelabelError(
                f"relabeler 'drex': {self.params.features!r} is not finite at episode "
                f"{int(ids[row])} step t={steps.column(cols.T)[row].as_py()}"
            )
        return values

    # ------------------------------------------------------------ setup, per part

    def part_sample(self, steps: pa.Table, episodes: pa.Table, part: Part) -> dict[str, Any]:
        """Snippets of this part's sampled episodes (at most `max_episodes` of them)."""
        episode_ids = episodes.column(cols.EPISODE_ID).to_numpy()
        noise_column = episodes.column(self.params.noise_column)
        noise = np.asarray(noise_column.to_numpy(zero_copy_only=False), dtype=np.float64)
        known = ~noise_column.is_null().to_numpy(zero_copy_only=False) & np.isfinite(noise)
        keys = hash_uniform(self.seed, episode_ids, 0, _STREAM_SAMPLE)
        candidates = np.flatnonzero(known)
        chosen = candidates[np.argsort(keys[candidates], kind="stable")][: self.params.max_episodes]
        features = self._features(steps)
        bounds = cols.episode_boundaries(steps.column(cols.EPISODE_ID).to_numpy())
        length = self.params.snippet_length
        sample = []
        for row in chosen:  # bounded by max_episodes: a loop over episodes, not steps
            start, stop = bounds[row], bounds[row + 1]
            span = max(stop - start - length, 0) + 1
            offsets = (
                hash_uniform(
                    self.seed,
                    episode_ids[row],
                    np.arange(self.params.snippets_per_episode),
                    _STREAM_SNIPPET,
                )
                * span
            ).astype(np.int64)
            snippets = [
                np.array(features[start + o : min(start + o + length, stop)]) for o in offsets
            ]
            sample.append(
                {
                    "key": float(keys[row]),
                    "episode_id": int(episode_ids[row]),
                    "noise": float(noise[row]),
                    "snippets": snippets,
                }
            )
        return {"episodes": sample}

    # ------------------------------------------------------------ setup, in the driver

    def train_reward(self, summaries: list[dict[str, Any]]) -> RewardNet:
        """Train r(observation) on ranked snippet pairs from every part's sample."""
        import torch

        sample = sorted(
            (e for s in summaries for e in s["episodes"]),
            key=lambda e: (e["key"], e["episode_id"]),
        )[: self.params.max_episodes]
        sample.sort(key=lambda e: e["episode_id"])
        noise_levels = sorted({e["noise"] for e in sample})
        if len(noise_levels) < 2:
            raise RelabelError(
                f"relabeler 'drex': needs episodes of at least two noise levels in "
                f"{self.params.noise_column!r}; found {noise_levels}"
            )
        ids = np.array([e["episode_id"] for e in sample], dtype=np.int64)
        heldout = hash_uniform(self.seed, ids, 0, _STREAM_SPLIT) < self.params.holdout
        if self.params.extrapolate:
            best = np.array([e["noise"] == noise_levels[0] for e in sample])
            heldout |= best
        train = [e for e, h in zip(sample, heldout) if not h]
        test = [e for e, h in zip(sample, heldout) if h]

        snippets: list[np.ndarray] = []
        owners: list[int] = []  # index into sample of each snippet
        for index, episode in enumerate(sample):
            for snippet in episode["snippets"]:
                snippets.append(np.asarray(snippet, dtype=np.float64))
                owners.append(index)
        owners_array = np.asarray(owners)
        noise = np.array([e["noise"] for e in sample])
        all_features = np.concatenate(snippets)
        mean = all_features.mean(axis=0)
        scale = all_features.std(axis=0) + 1e-6

        rng = np.random.default_rng(self.seed)
        train_set = {id(e) for e in train}
        train_snippets = np.flatnonzero([id(sample[o]) in train_set for o in owners_array])
        test_set = {id(e) for e in test}
        test_snippets = np.flatnonzero([id(sample[o]) in test_set for o in owners_array])
        train_pairs = _ranked_pairs(rng, train_snippets, owners_array, noise, self.params.pairs)
        test_pairs = _ranked_pairs(
            rng, test_snippets, owners_array, noise, max(self.params.pairs // 4, 10)
        )
        if len(train_pairs) == 0:
            raise RelabelError(
                "relabeler 'drex': no training pairs of different noise levels; "
                "lower holdout or give more episodes"
            )

        # A padded (snippets, length, inputs) tensor and a mask: snippets may be short.
        length = max(len(s) for s in snippets)
        padded = np.zeros((len(snippets), length, all_features.shape[1]))
        mask = np.zeros((len(snippets), length))
        for i, snippet in enumerate(snippets):
            padded[i, : len(snippet)] = (snippet - mean) / scale
            mask[i, : len(snippet)] = 1.0

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the same weights on every machine and run
        try:
            torch.manual_seed(self.seed)
            network = torch.nn.Sequential(
                torch.nn.Linear(all_features.shape[1], self.params.hidden),
                torch.nn.Tanh(),
                torch.nn.Linear(self.params.hidden, 1),
            ).double()
            optimizer = torch.optim.Adam(network.parameters(), lr=self.params.learning_rate)
            inputs = torch.from_numpy(padded)
            weights_mask = torch.from_numpy(mask)

            def snippet_returns(indices: np.ndarray) -> torch.Tensor:
                index = torch.from_numpy(indices)
                rewards = network(inputs[index]).squeeze(-1)
                return (rewards * weights_mask[index]).sum(dim=1)

            batch = 64
            for _ in range(self.params.epochs):
                order = rng.permutation(len(train_pairs))
                for start in range(0, len(order), batch):
                    pair = train_pairs[order[start : start + batch]]
                    better, worse = snippet_returns(pair[:, 0]), snippet_returns(pair[:, 1])
                    # Bradley-Terry: P(better > worse) = softmax over the two snippet returns.
                    loss = torch.nn.functional.softplus(worse - better).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            with torch.no_grad():
                accuracy = (
                    float(
                        (snippet_returns(test_pairs[:, 0]) > snippet_returns(test_pairs[:, 1]))
                        .double()
                        .mean()
                    )
                    if len(test_pairs)
                    else float("nan")
                )
                train_accuracy = float(
                    (snippet_returns(train_pairs[:, 0]) > snippet_returns(train_pairs[:, 1]))
                    .double()
                    .mean()
                )
            first, second = network[0], network[2]
            weights = {
                "w1": first.weight.detach().numpy().T.tolist(),
                "b1": first.bias.detach().numpy().tolist(),
                "w2": second.weight.detach().numpy()[0].tolist(),
                "b2": float(second.bias.detach().numpy()[0]),
                "mean": mean.tolist(),
                "scale": scale.tolist(),
            }
        finally:
            torch.set_num_threads(previous_threads)
        return RewardNet(
            weights=weights,
            heldout_episode_ids=np.array([e["episode_id"] for e in test], dtype=np.int64),
            train_episode_ids=np.array([e["episode_id"] for e in train], dtype=np.int64),
            best_noise=noise_levels[0],
            report={
                "train_episodes": len(train),
                "heldout_episodes": len(test),
                "train_pairs": int(len(train_pairs)),
                "heldout_pairs": int(len(test_pairs)),
                "train_pair_accuracy": round(train_accuracy, 4),
                "heldout_pair_accuracy": round(accuracy, 4),
                "noise_levels": noise_levels,
                "extrapolate": self.params.extrapolate,
            },
        )

    # ------------------------------------------------------------ per part

    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        if self.reward_net is None:
            raise RelabelError(
                f"{part}: relabeler 'drex' needs the reward net trained by setup(); for "
                "tables in memory use relabelers.base.relabel_tables"
            )
        reward = mlp_forward(self.reward_net.weights, self._features(steps))
        bounds = cols.episode_boundaries(steps.column(cols.EPISODE_ID).to_numpy())
        episode_return = np.add.reduceat(reward, bounds[:-1]) if len(reward) else np.zeros(0)
        # A dataset ingested without rewards has null returns: unknown, like no column.
        has_return = (
            cols.RETURN in episodes.column_names
            and episodes.column(cols.RETURN).null_count < episodes.num_rows
        )
        noise = episodes.column(self.params.noise_column).to_numpy(zero_copy_only=False)
        return Output(
            steps=pa.table({DREX_REWARD: pa.array(reward.astype(np.float32))}),
            episodes=pa.table({DREX_RETURN: pa.array(episode_return, type=pa.float64())}),
            # For the rank correlations of `finish`: what this part's episodes got.
            report={
                "episode_ids": episodes.column(cols.EPISODE_ID).to_numpy(),
                "drex_return": episode_return,
                "return": (
                    episodes.column(cols.RETURN).to_numpy(zero_copy_only=False)
                    if has_return
                    else None
                ),
                "noise": np.asarray(noise, dtype=np.float64),  # a null noise level: NaN
            },
        )

    # ------------------------------------------------------------ the report, in the driver

    def finish(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        """The training report, and how `drex_return` ranks episodes against the noise level
        and against the true return (when the dataset has one: without rewards it does not,
        and the report says `true_return: absent`)."""
        assert self.reward_net is not None
        report = dict(self.reward_net.report)
        ids = np.concatenate([np.asarray(r["episode_ids"], dtype=np.int64) for r in reports])
        predicted = np.concatenate([np.asarray(r["drex_return"]) for r in reports])
        noise = np.concatenate([np.asarray(r["noise"], dtype=np.float64) for r in reports])
        heldout = np.isin(ids, self.reward_net.heldout_episode_ids)
        train = np.isin(ids, self.reward_net.train_episode_ids)
        if any(r["return"] is None for r in reports):
            report["true_return"] = "absent"
        else:
            true = np.concatenate([np.asarray(r["return"], dtype=np.float64) for r in reports])
            report.update(
                spearman_return=round(spearman(predicted, true), 4),
                spearman_return_heldout=round(spearman(predicted[heldout], true[heldout]), 4),
            )
        finite = np.isfinite(noise)
        report["spearman_negative_noise"] = round(spearman(predicted[finite], -noise[finite]), 4)
        best = heldout & (noise == self.reward_net.best_noise)
        if self.params.extrapolate and best.any() and train.any():
            # How often an episode of the never-seen best level outranks training episodes.
            above = (predicted[best][:, None] > predicted[train][None, :]).mean()
            report["heldout_best_above_rest"] = round(float(above), 4)
        return report


def _ranked_pairs(
    rng: np.random.Generator,
    candidates: np.ndarray,
    owners: np.ndarray,
    noise: np.ndarray,
    count: int,
) -> np.ndarray:
    """(count, 2) snippet indices [better, worse] from episodes of different noise."""
    if len(candidates) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    first = rng.choice(candidates, size=count * 2)
    second = rng.choice(candidates, size=count * 2)
    noise_first, noise_second = noise[owners[first]], noise[owners[second]]
    different = noise_first != noise_second
    first, second = first[different], second[different]
    better_first = noise_first[different] < noise_second[different]
    better = np.where(better_first, first, second)
    worse = np.where(better_first, second, first)
    return np.stack([better, worse], axis=1)[:count].astype(np.int64)
