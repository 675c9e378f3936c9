"""`embed`: a sentence vector for every text of a column (e.g. `description`).

    hindsight relabel IN OUT --with embed:column=description,model=text-embedding-3-small

With an endpoint configured (the `base_url` parameter, or OPENAI_API_KEY / OPENAI_BASE_URL)
the vectors come from its OpenAI-compatible `/embeddings` API, in batches, through
relabelers/llm.py (concurrency, retries, budget) and cached per text, so re-running makes no
requests. Without one, a deterministic hashed bag-of-words vector (unit length) stands in, so
demos and CI run offline; the manifest says which embedder wrote the vectors.

Writes `<column>_embedding`: a fixed-size list of float32 (null where the text is null).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from relabelers import endpoint, llm
from relabelers.base import Columns, Inputs, Output, Params, Part, Relabeler, RelabelError
from relabelers.endpoint import endpoint_id as _endpoint_id
from schemas import steps as cols

PROBE_TEXT = "dimension probe"


class EmbedParams(llm.EndpointParams):
    column: str = Field("description", description="the text column to embed")
    level: Literal["episodes", "steps"] = Field("episodes", description="where the column is")
    output: str | None = Field(None, description="output column (default <column>_embedding)")
    embedder: Literal["auto", "endpoint", "hash"] = Field(
        "auto", description="auto: the endpoint when one is configured, else hashed words"
    )
    model: str = Field("text-embedding-3-small", description="embedding model at the endpoint")
    dimensions: int | None = Field(
        None, ge=1, description="vector size (endpoint: asked for if given; hash: default 64)"
    )
    batch_size: int = Field(64, ge=1, description="texts per request")
    concurrency: int = Field(8, ge=1, description="requests in flight per part")
    max_requests: int | None = Field(None, ge=0, description="request budget per part")


@dataclass(frozen=True)
class Embedder:
    """Decided once, in the driver, for every part: who writes the vectors, and their size."""

    kind: Literal["endpoint", "hash"]
    dimensions: int
    base_url: str | None


class EmbedRelabeler(Relabeler):
    name: ClassVar[str] = "embed"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[Params]] = EmbedParams

    def __init__(self, params: Any = None, seed: int = 0):
        super().__init__(params, seed)
        self.embedder: Embedder | None = None  # set by `setup`

    @property
    def output_name(self) -> str:
        return self.params.output or f"{self.params.column}_embedding"

    def reads(self) -> Columns:
        if self.params.level == "steps":
            return Columns(steps=(cols.EPISODE_ID, self.params.column))
        return Columns(episodes=(cols.EPISODE_ID, self.params.column))

    def writes(self) -> Columns:
        if self.params.level == "steps":
            return Columns(steps=(self.output_name,))
        return Columns(episodes=(self.output_name,))

    def setup(self, inputs: Inputs) -> None:
        """Decide the embedder and the vector size once, for every part; reads no data (an
        endpoint is asked once for its vector size unless `dimensions` is given)."""
        p = self.params
        use_endpoint = p.embedder == "endpoint" or (
            p.embedder == "auto" and endpoint.endpoint_configured(p.base_url)
        )
        base_url = endpoint.resolve_base_url(p.base_url)
        if not use_endpoint:
            dimensions = p.dimensions or 64
        elif p.dimensions:
            dimensions = p.dimensions
        else:  # ask the endpoint once (cached) so every part writes the same type
            vectors, failures = self._embed_with_endpoint([PROBE_TEXT], base_url)
            if failures:
                raise RelabelError(
                    f"embed: the endpoint {endpoint.endpoint_id(base_url)} did not answer a "
                    f"probe: {failures[0]}"
                )
            dimensions = len(vectors[PROBE_TEXT])
        self.embedder = Embedder("endpoint" if use_endpoint else "hash", dimensions, base_url)

    def finish(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.embedder is not None
        endpoint = self.embedder.kind == "endpoint"
        return {
            "embedder": self.embedder.kind,
            "dimensions": self.embedder.dimensions,
            "model": self.params.model if endpoint else "hashed-words-v1",
            # Where `ask` embeds a request for a policy trained on these vectors (public
            # form: no credentials).
            "endpoint": _endpoint_id(self.embedder.base_url) if endpoint else None,
        }

    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        p = self.params
        table = steps if p.level == "steps" else episodes
        if p.column not in table.column_names:
            raise RelabelError(
                f"embed: the {p.level} table has no column {p.column!r}; "
                f"available: {', '.join(table.column_names)}"
            )
        embedder = self.embedder
        if embedder is None:
            raise RelabelError(
                f"{part}: relabeler 'embed' decides its embedder in setup(); for tables in "
                "memory use relabelers.base.relabel_tables"
            )
        dimensions = embedder.dimensions
        # Embed each distinct text once; rows point at their text (vectorized take).
        encoded = pc.cast(table.column(p.column), pa.string()).combine_chunks().dictionary_encode()
        texts = encoded.dictionary.to_pylist()
        if embedder.kind == "endpoint":
            vectors, failures = self._embed_with_endpoint(texts, embedder.base_url)
            if failures:
                raise RelabelError(
                    f"embed: {len(failures)} batch(es) of {p.level} column {p.column!r} failed "
                    f"after retries at {endpoint.endpoint_id(embedder.base_url)}; first: "
                    f"{failures[0]} (re-run to retry; answers are cached)"
                )
            matrix = np.array([vectors[t] for t in texts], np.float32).reshape(-1, dimensions)
        else:
            matrix = (
                np.stack([hashed_words(t, dimensions) for t in texts])
                if texts
                else (np.zeros((0, dimensions), np.float32))
            )
        if matrix.shape[1] != dimensions:
            raise RelabelError(
                f"embed: the endpoint returned {matrix.shape[1]}-dim vectors, expected {dimensions}"
            )
        indices = encoded.indices
        valid = indices.is_valid().to_numpy(zero_copy_only=False)
        rows = np.zeros((len(indices), dimensions), np.float32)
        rows[valid] = matrix[indices.to_numpy(zero_copy_only=False)[valid].astype(np.int64)]
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(rows.reshape(-1)), dimensions, mask=pa.array(~valid)
        )
        output = pa.table({self.output_name: column})
        return Output(steps=output) if p.level == "steps" else Output(episodes=output)

    def _embed_with_endpoint(
        self, texts: list[str], base_url: str | None
    ) -> tuple[dict[str, list[float]], list[str]]:
        """Vectors for `texts`: from the per-text cache (keyed by the endpoint, too), the
        rest in batched requests."""
        p = self.params
        cache = llm.ResponseCache(p.cache)
        extra = {"dimensions": p.dimensions} if p.dimensions else {}
        where = endpoint.endpoint_id(base_url)

        def key(text: str) -> str:
            return llm.request_key("embedding", {"model": p.model, "input": text, **extra}, where)

        vectors: dict[str, list[float]] = {}
        missing = []
        for text in texts:
            found = cache.get(key(text))
            if found is not None:
                vectors[text] = found
            else:
                missing.append(text)
        batches = [missing[i : i + p.batch_size] for i in range(0, len(missing), p.batch_size)]
        requests = [
            llm.Request(
                "embeddings",
                {"model": p.model, "input": batch, "encoding_format": "float", **extra},
                parse=_embeddings_parser(len(batch)),
                store=False,
            )
            for batch in batches
        ]
        settings = llm.Settings(
            base_url=base_url,
            concurrency=p.concurrency,
            timeout=p.timeout,
            max_retries=p.max_retries,
        )
        budget = llm.Budget(max_requests=p.max_requests)
        results, _ = llm.run_requests(requests, settings, cache, budget)
        failures = []
        for batch, result in zip(batches, results):
            if result.status != "ok":
                failures.append(result.error or result.status)
                continue
            for text, vector in zip(batch, result.answer):
                meta = {"endpoint": where, "kind": "embedding", "model": p.model}
                cache.put(key(text), vector, meta)
                vectors[text] = vector
        return vectors, failures


def embed_like(texts: list[str], recorded: dict[str, Any]) -> np.ndarray:
    """Vectors [len(texts), D] for new texts exactly as the relabeler embedded its column:
    `recorded` is what a shard index keeps of it (embedder, model, endpoint, dimensions).
    An endpoint that does not answer is a RelabelError naming it (no credentials)."""
    dimensions = int(recorded["dimensions"])
    if recorded.get("embedder") != "endpoint":
        return np.stack([hashed_words(text, dimensions) for text in texts]).astype(np.float32)
    params = {
        "embedder": "endpoint",
        "model": recorded["model"],
        "base_url": recorded.get("endpoint"),
        "dimensions": recorded.get("requested_dimensions"),
        "max_retries": 2,  # a request, asked interactively: fail within seconds
    }
    relabeler = EmbedRelabeler(params)
    vectors, failures = relabeler._embed_with_endpoint(texts, params["base_url"])
    if failures:
        raise RelabelError(
            f"embed: the endpoint {endpoint.endpoint_id(params['base_url'])} (model "
            f"{recorded['model']!r}) did not embed {texts[0]!r}: {failures[0]}"
        )
    matrix = np.array([vectors[text] for text in texts], np.float32)
    if matrix.shape[1] != dimensions:
        raise RelabelError(
            f"embed: the endpoint returned {matrix.shape[1]}-dim vectors, the run was trained "
            f"on {dimensions}"
        )
    return matrix


def _embeddings_parser(count: int):
    def parse(response: Any) -> list[list[float]]:
        if isinstance(response, (str, bytes)):
            raise llm.InvalidAnswer("the endpoint answered with something that is not JSON")
        data = sorted(getattr(response, "data", None) or [], key=lambda d: d.index)
        if len(data) != count:
            raise llm.InvalidAnswer(f"asked for {count} vectors, got {len(data)}")
        vectors = [list(map(float, d.embedding)) for d in data]
        if not vectors[0] or any(len(v) != len(vectors[0]) for v in vectors):
            raise llm.InvalidAnswer("vectors are empty or of different sizes")
        return vectors

    return parse


def hashed_words(text: str, dimensions: int) -> np.ndarray:
    """A unit vector from hashed lower-case words (signed feature hashing)."""
    vector = np.zeros(dimensions, np.float32)
    for word in re.findall(r"\w+", text.lower()):
        digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        vector[digest % dimensions] += 1.0 if (digest >> 63) else -1.0
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
