"""Conditioning encoders: one small `nn.Module` per column type of the shard index.

The trainer reads the index's `conditions` entry of each requested column and picks the
encoder by its `type`; every encoder maps the loader's batch tensor to `[B, W, d_model]`,
and several columns are combined by summing their encodings (`ConditionEncoder`).
`condition=none` means no encoder at all: plain behaviour cloning.

Tensor shapes follow the loader's batch format (see trainers/loader/):
  scalar      float32 [B, W]     normalized here with the index's mean/std
  vector      float32 [B, W, D]  normalized per dimension with the index's mean/std
  categorical int64   [B, W]     index into the index's vocabulary
  text        int64   [B, L]     token ids of the shard-time vocabulary (0 = padding);
                                 one sentence per window, broadcast over the W steps
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SCALAR, VECTOR, CATEGORICAL, TEXT = "scalar", "vector", "categorical", "text"


def _std_or_one(values: Any) -> torch.Tensor:
    # A constant column (std 0) must not blow up the normalization.
    std = torch.as_tensor(values, dtype=torch.float32)
    return torch.where(std > 1e-6, std, torch.ones_like(std))


class ScalarEncoder(nn.Module):
    """A real number per step (return-to-go, an episode's return, a D-REX score)."""

    def __init__(self, spec: dict[str, Any], d_model: int):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(spec.get("mean", 0.0))))
        self.register_buffer("std", _std_or_one(float(spec.get("std", 1.0))))
        self.project = nn.Linear(1, d_model)

    def forward(self, values: torch.Tensor, window: int) -> torch.Tensor:
        normalized = (values.float() - self.mean) / self.std
        return self.project(normalized.unsqueeze(-1))


class VectorEncoder(nn.Module):
    """A fixed-size vector per step (a goal)."""

    def __init__(self, spec: dict[str, Any], d_model: int):
        super().__init__()
        dim = int(spec["dim"])
        self.register_buffer("mean", torch.as_tensor(spec.get("mean", [0.0] * dim)).float())
        self.register_buffer("std", _std_or_one(spec.get("std", [1.0] * dim)))
        self.project = nn.Linear(dim, d_model)

    def forward(self, values: torch.Tensor, window: int) -> torch.Tensor:
        return self.project((values.float() - self.mean) / self.std)


class CategoricalEncoder(nn.Module):
    """A label per step (a skill level), learned embedding over the index's vocabulary."""

    def __init__(self, spec: dict[str, Any], d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(max(1, len(spec["vocabulary"])), d_model)

    def forward(self, values: torch.Tensor, window: int) -> torch.Tensor:
        return self.embedding(values.long())


class TextEncoder(nn.Module):
    """A sentence per window: mean of learned word embeddings over the shard-time vocabulary
    (padding id 0 ignored), then a small MLP; the result conditions every step of the window."""

    def __init__(self, spec: dict[str, Any], d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(max(2, len(spec["vocabulary"])), d_model, padding_idx=0)
        self.mix = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )

    def forward(self, tokens: torch.Tensor, window: int) -> torch.Tensor:
        tokens = tokens.long()
        present = (tokens != 0).float().unsqueeze(-1)
        pooled = (self.embedding(tokens) * present).sum(1) / present.sum(1).clamp(min=1.0)
        return self.mix(pooled).unsqueeze(1).expand(-1, window, -1)


ENCODERS: dict[str, type[nn.Module]] = {
    SCALAR: ScalarEncoder,
    VECTOR: VectorEncoder,
    CATEGORICAL: CategoricalEncoder,
    TEXT: TextEncoder,
}


def condition_specs(conditions: dict[str, Any], columns: list[str]) -> dict[str, dict[str, Any]]:
    """The index entries of the requested columns, with a clear error for an unknown one."""
    specs = {}
    for column in columns:
        if column not in conditions:
            raise KeyError(
                f"condition column {column!r} is not in the shard index; "
                f"available: {sorted(conditions) or 'none (shard with --condition)'}"
            )
        spec = dict(conditions[column])
        if spec.get("type") not in ENCODERS:
            raise ValueError(
                f"condition column {column!r} has type {spec.get('type')!r}; "
                f"expected one of {sorted(ENCODERS)}"
            )
        specs[column] = spec
    return specs


class ConditionEncoder(nn.Module):
    """Sum of one encoder per requested column; zeros when no column is requested (BC)."""

    def __init__(self, specs: dict[str, dict[str, Any]], d_model: int):
        super().__init__()
        self.columns = list(specs)
        self.d_model = d_model
        self.encoders = nn.ModuleDict(
            {column: ENCODERS[spec["type"]](spec, d_model) for column, spec in specs.items()}
        )

    def forward(self, batch: dict[str, torch.Tensor], batch_size: int, window: int) -> torch.Tensor:
        total: torch.Tensor | None = None
        for column in self.columns:
            if column not in batch:
                raise KeyError(f"batch has no condition column {column!r}")
            encoded = self.encoders[column](batch[column], window)
            total = encoded if total is None else total + encoded
        if total is None:
            device = next(iter(batch.values())).device
            return torch.zeros(batch_size, window, self.d_model, device=device)
        return total
