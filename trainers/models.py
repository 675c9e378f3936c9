"""The two policies p(action | states, g): an MLP over (state, g) (RvS-style) and a small
causal transformer over the window (Decision-Transformer-style).

Both take a loader batch (trainers/loader/) and return one action prediction per step of
the window, so the same loss (`action_loss`) and the same rollout code serve both:
- continuous actions: the prediction is the action scaled to [-1, 1] by the index's
  low/high, trained with mean squared error, un-scaled and clipped at act time;
- discrete actions: logits over the index's `n` actions, trained with cross-entropy.
Positions where `mask` is False (left padding at an episode's start) carry no loss.

What a step shows the policy is its state vector, its camera frames through an image
encoder per camera (trainers/frames.py), or both, joined (`Policy.step_inputs`); a run
without frames builds exactly the model it built before frames existed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers.encoders import ConditionEncoder
from trainers.frames import FrameEncoder, frames_config
from trainers.minigrid_view import (
    MINIGRID_LAYOUT_DIM,
    MINIGRID_ONE_HOT,
    MINIGRID_ONE_HOT_DIM,
    MINIGRID_RELATIONAL,
    VIEW_MATCH_FACTORED,
    is_minigrid_view,
    minigrid_layout,
    minigrid_one_hot,
    view_match,
)


def model_config(
    index: dict[str, Any],
    conditions: list[str],
    *,
    kind: str = "transformer",
    d_model: int = 128,
    n_layer: int = 3,
    n_head: int = 4,
    hidden: int = 256,
    window: int | None = None,
    inputs: str | None = None,
    cameras: list[str] | None = None,
    frame_encoder: str | None = None,
    text_encoder: str = "tokens",
) -> dict[str, Any]:
    """Everything needed to rebuild a model, as plain data (it travels in checkpoints).

    `window` is the steps per training window (default: the shards' window); `n_layer` the
    MLP's hidden layers or the transformer's blocks (trainers.options.MODEL_DEFAULTS);
    `inputs`, `cameras` and `frame_encoder` what the policy sees (trainers.frames);
    `text_encoder` how its text conditions are encoded (trainers.text)."""
    from trainers.encoders import condition_specs
    from trainers.text import with_text_encoder

    if kind not in ("transformer", "mlp"):
        raise ValueError(f"--model must be 'transformer' or 'mlp', got {kind!r}")
    shard_window = int(index["window"])
    window = shard_window if window is None else window
    if not 1 <= window <= shard_window:
        raise ValueError(
            f"--window must be between 1 and the shards' window ({shard_window}), got {window}"
        )
    config = {
        "kind": kind,
        "observation_dim": int(math.prod(index["observation"]["shape"] or [0])),
        "action": dict(index["action"]),
        "conditions": with_text_encoder(
            condition_specs(index.get("conditions", {}), conditions), text_encoder
        ),
        "window": int(window),
        # Per-dimension statistics from the shard index when it has them; otherwise the
        # trainer fits them on its first batch.
        "observation_mean": index["observation"].get("mean"),
        "observation_std": index["observation"].get("std"),
        "d_model": d_model,
        "n_layer": n_layer,
        "n_head": n_head,
        "hidden": hidden,
        "max_timestep": 4096,
    }
    frames = frames_config(index, inputs=inputs, cameras=cameras, encoder=frame_encoder)
    if frames is not None:  # a config without this key is a policy on the state vector alone
        config["frames"] = frames
    if is_minigrid_view(index):  # a config without this key reads its state as floats
        config["observation_encoding"] = MINIGRID_RELATIONAL
        config["view_match"] = VIEW_MATCH_FACTORED  # without the key: the additive match
    if kind == "mlp":
        # An MLP config without this key is an older one: 3 hidden layers, whatever n_layer.
        config["mlp_layers"] = n_layer
    return config


class ActionSpace(nn.Module):
    """Scaling between environment actions and what the network predicts."""

    def __init__(self, action: dict[str, Any]):
        super().__init__()
        self.discrete = action["kind"] == "discrete"
        if self.discrete:
            self.output_dim = int(action["n"])
            return
        dim = int(action["dim"])
        low = torch.as_tensor(action.get("low", [-1.0] * dim), dtype=torch.float32)
        high = torch.as_tensor(action.get("high", [1.0] * dim), dtype=torch.float32)
        bounded = torch.isfinite(low) & torch.isfinite(high) & (high > low)
        center = torch.where(bounded, (high + low) / 2, torch.zeros_like(low))
        half = torch.where(bounded, (high - low) / 2, torch.ones_like(low))
        self.register_buffer("center", center)
        self.register_buffer("half_range", half)
        self.register_buffer("low", torch.where(bounded, low, torch.full_like(low, -math.inf)))
        self.register_buffer("high", torch.where(bounded, high, torch.full_like(high, math.inf)))
        self.output_dim = dim

    def to_network(self, action: torch.Tensor) -> torch.Tensor:
        return action if self.discrete else (action - self.center) / self.half_range

    def to_env(self, prediction: torch.Tensor) -> torch.Tensor:
        """Greedy action from a prediction: argmax, or un-scaled and clipped to the box."""
        if self.discrete:
            return prediction.argmax(-1)
        action = prediction * self.half_range + self.center
        return torch.maximum(torch.minimum(action, self.high), self.low)


class Policy(nn.Module):
    """Shared parts: observation normalization, conditioning, action space, loss."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        dim = config["observation_dim"]
        # From the index, or from the first batch (`fit_observation_normalizer`); saved
        # with the weights, so a rollout normalizes exactly like training.
        mean, std = config.get("observation_mean"), config.get("observation_std")
        self.register_buffer(
            "observation_mean", torch.as_tensor(mean).float() if mean else torch.zeros(dim)
        )
        self.register_buffer(
            "observation_std",
            torch.as_tensor(std).float().clamp(min=1e-3) if std else torch.ones(dim),
        )
        self.actions = ActionSpace(config["action"])
        self.condition = ConditionEncoder(config["conditions"], config["d_model"])
        frames = config.get("frames")
        self.uses_state = frames is None or frames["inputs"] != "frames"
        # Created only for a run with frames, so a run without them draws the same initial
        # weights as before frames existed.
        self.frames = FrameEncoder(frames, config["d_model"]) if frames else None
        encoding = config.get("observation_encoding")
        self.one_hot = encoding in (MINIGRID_ONE_HOT, MINIGRID_RELATIONAL)
        self.layout_only = encoding == MINIGRID_RELATIONAL
        # A MiniGrid view is also matched against the condition, cell by cell (ViewMatch).
        self.view_match = (
            view_match(config.get("view_match"), config["d_model"]) if self.one_hot else None
        )
        state_dim = MINIGRID_ONE_HOT_DIM if self.one_hot else dim
        state_dim = MINIGRID_LAYOUT_DIM if self.layout_only else state_dim
        state_dim += self.view_match.output_dim if self.view_match is not None else 0
        self.input_dim = (state_dim if self.uses_state else 0) + (
            self.frames.output_dim if self.frames is not None else 0
        )

    @torch.no_grad()
    def fit_observation_normalizer(self, batch: dict[str, torch.Tensor]) -> None:
        if not self.uses_state:
            return
        observations = batch["observation"].reshape(-1, self.config["observation_dim"])
        valid = observations[batch["mask"].reshape(-1)]
        if len(valid) > 1:
            self.observation_mean.copy_(valid.mean(0))
            self.observation_std.copy_(valid.std(0).clamp(min=1e-3))

    def normalized_observation(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        observation = batch["observation"].float()
        observation = observation.reshape(*observation.shape[:2], -1)
        if self.one_hot:
            return minigrid_one_hot(observation)
        return (observation - self.observation_mean) / self.observation_std

    def step_inputs(self, batch: dict[str, torch.Tensor], condition: torch.Tensor) -> torch.Tensor:
        """What the policy sees of each step, [B, W, input_dim]: the normalized state vector
        (a MiniGrid view one-hot, with its match against `condition`), the frames' features,
        or both, concatenated."""
        parts = [self.normalized_observation(batch)] if self.uses_state else []
        if self.view_match is not None:
            parts.append(self.view_match(parts[0], condition))
            if self.layout_only:  # identities only through the match (trainers/minigrid_view.py)
                parts[0] = minigrid_layout(parts[0])
        if self.frames is not None:
            parts.append(self.frames(batch))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        prediction = self(batch).float()
        mask = batch["mask"]
        if self.actions.discrete:
            per_step = F.cross_entropy(
                prediction.reshape(-1, prediction.shape[-1]),
                batch["action"].reshape(-1).long(),
                reduction="none",
            ).reshape(mask.shape)
        else:
            target = self.actions.to_network(batch["action"].float())
            per_step = ((prediction - target) ** 2).mean(-1)
        weight = mask.float()
        return (per_step * weight).sum() / weight.sum().clamp(min=1.0)


class MLPPolicy(Policy):
    """RvS: an MLP on (state_t, g_t), applied to every step of the window independently
    (by default the window is one step: the MLP trains on single steps)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        hidden, d_model = config["hidden"], config["d_model"]
        layers: list[nn.Module] = []
        width = self.input_dim + d_model
        for _ in range(int(config.get("mlp_layers", 3))):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.network = nn.Sequential(*layers, nn.Linear(width, self.actions.output_dim))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch_size, window = batch["mask"].shape[:2]
        condition = self.condition(batch, batch_size, window)
        inputs = self.step_inputs(batch, condition)
        return self.network(torch.cat([inputs, condition], dim=-1))


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention (nanoGPT's, minus dropout)."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch_size, window, d_model = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d_model, dim=-1)
        heads = (batch_size, window, self.n_head, d_model // self.n_head)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        x = x + self.out(attended.transpose(1, 2).reshape(batch_size, window, d_model))
        return x + self.mlp(self.norm2(x))


class TransformerPolicy(Policy):
    """Decision-Transformer-style: one token per step (state, g, previous action, timestep),
    causal attention over the window, the action of each step predicted from its token."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        d_model = config["d_model"]
        self.embed_observation = nn.Linear(self.input_dim, d_model)  # state and/or frames
        if self.actions.discrete:
            # Index n stands for "no previous action" (first step of a window).
            self.embed_previous_action = nn.Embedding(self.actions.output_dim + 1, d_model)
        else:
            self.embed_previous_action = nn.Linear(self.actions.output_dim, d_model)
        self.embed_timestep = nn.Embedding(config["max_timestep"], d_model)
        self.embed_position = nn.Embedding(config["window"], d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, config["n_head"]) for _ in range(config["n_layer"])
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, self.actions.output_dim)

    def previous_actions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        action, mask = batch["action"], batch["mask"]
        valid = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
        if self.actions.discrete:
            shifted = torch.cat([action[:, :1].long(), action[:, :-1].long()], dim=1)
            return self.embed_previous_action(
                torch.where(valid, shifted, torch.full_like(shifted, self.actions.output_dim))
            )
        scaled = self.actions.to_network(action.float())
        shifted = torch.cat([torch.zeros_like(scaled[:, :1]), scaled[:, :-1]], dim=1)
        return self.embed_previous_action(shifted * valid.unsqueeze(-1).float())

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch_size, window = batch["mask"].shape[:2]
        condition = self.condition(batch, batch_size, window)
        observation = self.step_inputs(batch, condition)
        mask = batch["mask"]
        timestep = batch["timestep"].long().clamp(0, self.config["max_timestep"] - 1)
        position = torch.arange(window, device=observation.device)
        x = (
            self.embed_observation(observation)
            + condition
            + self.previous_actions(batch)
            + self.embed_timestep(timestep)
            + self.embed_position(position)
        )
        # Causal, and never attend to left padding; a padded query attends to itself
        # (so no row is all -inf); its output carries no loss.
        causal = torch.ones(window, window, dtype=torch.bool, device=x.device).tril()
        allowed = causal & mask[:, None, :]
        allowed = allowed | torch.eye(window, dtype=torch.bool, device=x.device)
        attention_mask = allowed.unsqueeze(1)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.head(self.norm(x))


def build_model(config: dict[str, Any]) -> Policy:
    """The policy a config describes (`model_config`)."""
    return {"mlp": MLPPolicy, "transformer": TransformerPolicy}[config["kind"]](config)
