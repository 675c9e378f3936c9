"""Pretrained sentence embedders the trainer can condition on (`train --text-encoder NAME`).

An embedder maps texts to unit vectors, offline: its model ships inside its pip package and
nothing is downloaded at run time. It is frozen: a run embeds the shard index's distinct
texts once at train start (`ConditionInfo.texts`, in the normalized form the shards hold,
`schemas.shard_index.normalized_text`) into a table saved with the weights, and `ask`
embeds a request the same way, with the embedder, name and version the run recorded.

    wordllama   WordLlama's l2_supercat 256-d token embeddings (average-pooled subword
                vectors distilled from Llama 2's embedding layer; MIT). The `wordllama`
                package (~19 MB wheel: numpy, tokenizers, safetensors) ships the weights;
                install with `pip install 'hindsight-engine[text]'`.

Measured on this machine (cosine similarity; docs/trainer.md): crimson/red 0.23 vs
crimson/blue -0.03; "walk up to the crimson key" vs "go to the red key" 0.45, vs "go to the
blue ball" 0.00.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

# Text encoders that need no embedder: learned word embeddings over the shard vocabulary,
# and vectors the `embed` relabeler wrote into the dataset.
TOKENS = "tokens"
EMBEDDINGS = "embeddings"
OFFLINE_ALTERNATIVE = (
    "--text-encoder tokens works offline with no extra package (learned word embeddings "
    "over the shard vocabulary; unseen words become <unk>)"
)


class EmbedderUnavailable(RuntimeError):
    """A text encoder that cannot run here (not installed, or its model is not on disk)."""


@dataclass(frozen=True)
class EmbedderInfo:
    """What a run records about its embedder (in the model config of each text column)."""

    name: str
    version: str
    dimensions: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "dimensions": self.dimensions}


class WordLlamaEmbedder:
    """WordLlama l2_supercat, 256 dimensions, from the files its wheel ships."""

    name = "wordllama"
    config = "l2_supercat"
    dimensions = 256
    package = "wordllama"

    def __init__(self) -> None:
        try:
            # wordllama calls logging.basicConfig at import; keep the host's logging as it was.
            root = logging.getLogger()
            handlers, level = list(root.handlers), root.level
            import wordllama
            from wordllama import WordLlama

            if not handlers:
                for handler in root.handlers[:]:
                    root.removeHandler(handler)
            root.setLevel(level)
        except ImportError as error:
            raise EmbedderUnavailable(
                f"text encoder 'wordllama' needs the wordllama package ({error}); install it "
                f"with pip install 'hindsight-engine[text]' (its model ships inside, no "
                f"download), or use {OFFLINE_ALTERNATIVE}"
            ) from None
        # The wheel ships weights/ and tokenizers/ next to the package; pointing the cache
        # there (and never downloading) loads exactly those files.
        home = Path(wordllama.__file__).parent
        try:
            self.model = WordLlama.load(
                config=self.config, dim=self.dimensions, cache_dir=home, disable_download=True
            )
        except (FileNotFoundError, OSError, ValueError) as error:
            raise EmbedderUnavailable(
                f"text encoder 'wordllama' cannot load its model offline from {home} ({error}); "
                f"reinstall the wordllama package, or use {OFFLINE_ALTERNATIVE}"
            ) from None
        self.version = f"{metadata.version(self.package)} {self.config}_{self.dimensions}"

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors [len(texts), 256] float32, one batch call."""
        if not texts:
            return np.zeros((0, self.dimensions), np.float32)
        vectors = np.asarray(self.model.embed(list(texts), norm=True), dtype=np.float32)
        return _unit(vectors)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


EMBEDDERS = {WordLlamaEmbedder.name: WordLlamaEmbedder}
TEXT_ENCODERS = (TOKENS, *EMBEDDERS, EMBEDDINGS)


@cache
def load_embedder(name: str) -> WordLlamaEmbedder:
    """The embedder `name`, loaded once per process (EmbedderUnavailable: why, and what
    works offline instead)."""
    if name not in EMBEDDERS:
        raise EmbedderUnavailable(
            f"unknown text encoder {name!r}; known: {', '.join(TEXT_ENCODERS)} "
            f"({OFFLINE_ALTERNATIVE})"
        )
    return EMBEDDERS[name]()


def embedder_info(name: str) -> EmbedderInfo:
    """Name, version and size of an embedder (loads it: a run fails at once, before any
    training, when the embedder is not available)."""
    embedder = load_embedder(name)
    return EmbedderInfo(embedder.name, embedder.version, embedder.dimensions)


def check_version(recorded: dict[str, Any]) -> WordLlamaEmbedder:
    """The embedder a run recorded, as installed here; a different version is an error,
    since its vectors would not be the ones the policy was trained on."""
    embedder = load_embedder(str(recorded["name"]))
    if embedder.version != recorded.get("version"):
        raise EmbedderUnavailable(
            f"the run embedded its texts with {recorded['name']} {recorded.get('version')}, "
            f"this machine has {embedder.version}: install that version to ask this run"
        )
    return embedder


def with_text_encoder(specs: dict[str, dict[str, Any]], encoder: str) -> dict[str, dict[str, Any]]:
    """The run's condition specs with `encoder` recorded on its text columns (and, for a
    pretrained embedder, its name, version and size); with `embeddings`, the vector columns
    the `embed` relabeler wrote become text columns encoded from those vectors."""
    if encoder not in TEXT_ENCODERS:
        raise ValueError(f"--text-encoder must be one of {', '.join(TEXT_ENCODERS)}, not {encoder!r}")  # fmt: skip
    texts = [column for column, spec in specs.items() if spec["type"] == "text"]
    embedded = [
        c for c, spec in specs.items() if spec["type"] == "vector" and spec.get("embedding")
    ]
    specs = {column: dict(spec) for column, spec in specs.items()}
    if encoder == EMBEDDINGS:
        if texts:
            raise ValueError(
                f"--text-encoder embeddings conditions on vectors the `embed` relabeler wrote; "
                f"{texts} hold text: relabel with --with embed:column={texts[0]} and condition "
                f"on {texts[0]}_embedding, or use --text-encoder tokens or wordllama"
            )
        if not embedded:
            raise ValueError(
                "--text-encoder embeddings: no condition column was written by the `embed` "
                f"relabeler (conditions: {sorted(specs) or 'none'})"
            )
        for column in embedded:
            specs[column].update(type="text", encoder=EMBEDDINGS)
        return specs
    info = embedder_info(encoder) if texts and encoder != TOKENS else None
    for column in texts:
        specs[column]["encoder"] = encoder
        if info is not None:
            if specs[column].get("texts") is None:
                raise ValueError(
                    f"--text-encoder {encoder}: the shard index lists no texts for {column!r} "
                    "(more distinct texts than it keeps, or shards written before it listed "
                    "them); re-shard, or use --text-encoder tokens"
                )
            specs[column]["embedder"] = info.to_dict()
    return specs


# ---------------------------------------------------------------- ask


def encode_request(spec: dict[str, Any], text: str, episodes: int) -> Any:
    """A requested text as the run's text encoder saw its training texts, for `episodes`
    rollouts side by side: token ids [episodes, L] (tokens), or the sentence vector
    [episodes, D] (a pretrained embedder: the run's name and version; embeddings: the
    relabeler's endpoint and model)."""
    import torch

    from schemas.shard_index import encode_text, normalized_text

    encoder = spec.get("encoder", TOKENS)
    if encoder == TOKENS:
        tokens = encode_text([text], spec["vocabulary"], int(spec["max_tokens"]))
        return torch.from_numpy(tokens.astype(np.int64)).repeat(episodes, 1)
    if encoder == EMBEDDINGS:
        from relabelers.base import RelabelError
        from relabelers.embed import embed_like

        recorded = spec["embedding"]
        try:
            vector = embed_like([text], recorded)
        except RelabelError as error:
            raise EmbedderUnavailable(
                f"{error}. This run's text encoder is `embeddings` (that endpoint's vectors); "
                "to ask with no endpoint, train with --text-encoder wordllama (its model ships "
                f"in the package) or {OFFLINE_ALTERNATIVE}"
            ) from None
    else:
        embedder = check_version(spec["embedder"])
        vector = embedder.embed([normalized_text(text)])
    return torch.from_numpy(vector.astype(np.float32)).repeat(episodes, 1)


def request_warnings(
    index: dict[str, Any], specs: dict[str, dict[str, Any]], values: dict[str, Any]
) -> list[str]:
    """What a user should know about a request before trusting the answer (never an error):
    a value the shards held out (`shard --exclude`; for text, a request that contains an
    excluded text), and words of a request that a `tokens` run has never seen."""
    from schemas.shard_index import normalized_text, words

    found = index.get("exclusions") or {}
    excluded = found.get("values") or {}
    lines = []
    for column, value in values.items():
        spec = specs.get(column) or {}
        if value is None or spec.get("type") not in ("text", "categorical"):
            continue
        text = str(value)
        held = excluded.get(column) or excluded.get(_embedded_column(spec)) or []
        if spec["type"] == "text":
            asked = f" {normalized_text(text)} "
            hits = [v for v in held if f" {normalized_text(v)} " in asked]
        else:
            hits = [v for v in held if v == text]
        if hits:
            lines.append(
                f"{column}={text!r} asks for {hits[0]!r}, which was held out of training "
                f"(shard --exclude {found.get('predicate')!r}): the policy never saw it"
            )
        if spec["type"] == "text" and spec.get("encoder", TOKENS) == TOKENS:
            vocabulary = set(spec.get("vocabulary") or ())
            unseen = [word for word in words(text) if word not in vocabulary]
            if unseen:
                lines.append(
                    f"{column}: {len(unseen)} word(s) of the request were never in training "
                    f"({', '.join(unseen[:8])}) and encode as <unk>; a run trained with "
                    "--text-encoder wordllama reads unseen words by their meaning"
                )
    return lines


def _embedded_column(spec: dict[str, Any]) -> str | None:
    """The text column an `embeddings` condition was embedded from (its exclusions)."""
    return (spec.get("embedding") or {}).get("column")
