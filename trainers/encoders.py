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

A text column is encoded by the run's `--text-encoder` (recorded as `encoder` in its spec):
  tokens      learned word embeddings over the shard vocabulary (`TextEncoder`); a word the
              vocabulary lacks is <unk> (id 1), never dropped, and <unk> is trained by
              replacing 10% of the words with it (seeded by the run), so an unseen word
              means "some word" instead of a random vector
  wordllama   a frozen pretrained sentence embedder (trainers/text.py) through a table of
              the index's distinct texts, embedded once at train start, saved with the
              weights (`PretrainedTextEncoder`); `ask` passes the request's vector
  embeddings  vectors the `embed` relabeler wrote ([B, W, D] from a vector column whose
              index entry records `embedding`; `EmbeddingsTextEncoder`)
each followed by a small trainable projection.
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
    (padding id 0 ignored), then a small MLP; the result conditions every step of the window.
    In training a word is replaced by <unk> with probability `UNKNOWN_RATE`."""

    UNKNOWN_RATE = 0.1

    def __init__(self, spec: dict[str, Any], d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(max(2, len(spec["vocabulary"])), d_model, padding_idx=0)
        self.mix = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model)
        )

    def forward(self, tokens: torch.Tensor, window: int) -> torch.Tensor:
        tokens = tokens.long()
        if self.training:
            drop = torch.rand(tokens.shape, device=tokens.device) < self.UNKNOWN_RATE
            tokens = torch.where(drop & (tokens != 0), torch.ones_like(tokens), tokens)
        present = (tokens != 0).float().unsqueeze(-1)
        pooled = (self.embedding(tokens) * present).sum(1) / present.sum(1).clamp(min=1.0)
        return self.mix(pooled).unsqueeze(1).expand(-1, window, -1)


def _projection(dim: int, d_model: int) -> nn.Module:
    """The trainable part on top of a frozen sentence vector: linear, so that it composes as
    the vectors do. A Linear-GELU-Linear head fit on a few dozen distinct sentences mapped
    held-out colour-object pairs elsewhere (BabyAI, docs/trainer.md: held-out success 0.23 vs
    0.75 with this head, seed 0)."""
    return nn.Linear(dim, d_model)


# Token rows are matched to the index's texts by a hash: a weighted sum of the token ids with
# fixed random 40-bit weights (ids < 2**16, at most 64 tokens: no int64 overflow).
_HASH_SEED = 20240611


def token_hashes(tokens: torch.Tensor) -> torch.Tensor:
    """int64 [N] hash of each row of token ids [N, L]."""
    generator = torch.Generator().manual_seed(_HASH_SEED)
    weights = torch.randint(1, 2**40, (tokens.shape[-1],), generator=generator)
    return (tokens.long() * weights.to(tokens.device)).sum(-1)


class PretrainedTextEncoder(nn.Module):
    """A sentence per window through a frozen pretrained embedder: the window's token row
    is looked up in the table of the index's distinct texts (`vectors`, filled once by
    `embed_texts` at train start and saved with the weights); `ask` passes the request's
    vector instead of tokens. Then a small trainable projection."""

    def __init__(self, spec: dict[str, Any], d_model: int):
        super().__init__()
        from schemas.shard_index import encode_text

        texts = spec.get("texts")
        if texts is None:
            raise ValueError(
                "the shard index lists no texts for this column (more than the index keeps, or "
                "shards written before texts were listed); re-shard it, or train with "
                "--text-encoder tokens"
            )
        self.texts = list(texts)
        self.embedder = dict(spec["embedder"])
        self.max_tokens = int(spec.get("max_tokens") or 1)
        tokens = torch.from_numpy(encode_text(self.texts, spec["vocabulary"], self.max_tokens))
        hashes = token_hashes(tokens)
        order = torch.argsort(hashes)
        self.register_buffer("hashes", hashes[order], persistent=False)
        self.register_buffer("rows", order, persistent=False)
        dim = int(self.embedder["dimensions"])
        self.register_buffer("vectors", torch.zeros(len(self.texts), dim))
        self.project = _projection(dim, d_model)

    @torch.no_grad()
    def embed_texts(self) -> None:
        """Fill the table: every distinct text embedded once, as the shards hold it."""
        from schemas.shard_index import normalized_text
        from trainers.text import load_embedder

        embedder = load_embedder(self.embedder["name"])
        normalized = [normalized_text(text) for text in self.texts]
        self.vectors.copy_(torch.from_numpy(embedder.embed(normalized)))

    def forward(self, values: torch.Tensor, window: int) -> torch.Tensor:
        if values.is_floating_point():  # a request's vector (ask)
            vectors = values.to(self.vectors.dtype)
        elif len(self.texts) == 0:
            vectors = torch.zeros(values.shape[0], self.vectors.shape[1], device=values.device)
        else:
            found = token_hashes(values)
            position = torch.searchsorted(self.hashes, found).clamp(max=len(self.texts) - 1)
            known = (self.hashes[position] == found).unsqueeze(-1)
            vectors = self.vectors[self.rows[position]] * known  # an unknown row: zeros
        return self.project(vectors).unsqueeze(1).expand(-1, window, -1)


class EmbeddingsTextEncoder(nn.Module):
    """Sentence vectors the `embed` relabeler wrote (a vector column, [B, W, D]), scaled to
    unit length, then a small trainable projection."""

    def __init__(self, spec: dict[str, Any], d_model: int):
        super().__init__()
        self.project = _projection(int(spec["dim"]), d_model)

    def forward(self, vectors: torch.Tensor, window: int) -> torch.Tensor:
        vectors = vectors.float()
        if vectors.dim() == 2:  # one vector per window (ask): every step gets it
            vectors = vectors.unsqueeze(1).expand(-1, window, -1)
        return self.project(torch.nn.functional.normalize(vectors, dim=-1))


TEXT_ENCODER_MODULES: dict[str, type[nn.Module]] = {
    "tokens": TextEncoder,
    "pretrained": PretrainedTextEncoder,
    "embeddings": EmbeddingsTextEncoder,
}


def encoder_class(spec: dict[str, Any]) -> type[nn.Module]:
    """The module of a column's spec: by type, and for text by its recorded encoder."""
    if spec["type"] == TEXT:
        return TEXT_ENCODER_MODULES[text_encoder_kind(spec)]
    return ENCODERS[spec["type"]]


def text_encoder_kind(spec: dict[str, Any]) -> str:
    """tokens (also every run recorded before text encoders had a choice), pretrained or
    embeddings."""
    encoder = spec.get("encoder", "tokens")
    return encoder if encoder in ("tokens", "embeddings") else "pretrained"


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
            {column: encoder_class(spec)(spec, d_model) for column, spec in specs.items()}
        )

    def embed_texts(self) -> None:
        """A new run: fill the tables of its pretrained text encoders (once, at train start)."""
        for encoder in self.encoders.values():
            if isinstance(encoder, PretrainedTextEncoder):
                encoder.embed_texts()

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
