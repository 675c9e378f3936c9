"""Benchmark of text encoding for `--text-encoder wordllama`, at each place it happens,
against the embedder's own batch call on the same texts in the same run (the ceiling).

    .venv/bin/python -m bench.text --out bench/results/text.json [--texts 3000] [--requests 200]

Texts are BabyAI-like instructions and paraphrases ("walk up to the crimson key"), all
distinct. Rows, in sentences per second:
- `batch_call` (the ceiling): `WordLlamaEmbedder.embed` on every text in one call;
- `shard`: what the shard job does with text (pass one: distinct texts and word counts,
  `summarize_vocabulary`; pass two: token tables, `condition_values`) on a step column that
  repeats each text over 10 steps (sentences = distinct texts);
- `train_start`: building the pretrained text encoder over the index's texts (token rows and
  their hashes) and filling its table (`embed_texts`: one batch call);
- `ask`: `encode_request`, one request at a time as `ask` does (each a batch call of one),
  next to the batch call on the same requests; and the `tokens` encoder's requests.

Also a quality probe, `synonym_probe`: a small MLP on the frozen vectors learns the colour of
"go to the {colour} {object}" (6 colours x 3 objects, the data's own words), then reads the
colour of 144 requests in words it never saw ("walk up to the crimson key", "approach the
azure ball"); accuracy over 5 seeds (chance 1/6; the `tokens` encoder reads every unseen
colour word as <unk>, so it is at chance by construction).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench import save_results
from engine.shards.conditions import (
    ConditionColumn,
    combine_vocabulary,
    condition_values,
    summarize_vocabulary,
)

COLOURS = ["red", "green", "blue", "purple", "yellow", "grey", "crimson", "scarlet"]
OBJECTS = ["key", "ball", "box", "door"]
VERBS = ["go to", "walk up to", "move to", "head to", "approach", "get to", "navigate to"]
ENDINGS = ["", " now", " please", " quickly", " carefully", " right away"]


def instruction_texts(count: int) -> list[str]:
    """`count` distinct instruction-like sentences (a seeded sample of the grammar)."""
    texts = [
        f"{verb} the {colour} {thing}{ending}{'' if n == 0 else f' number {n}'}"
        for n in range(count // (len(COLOURS) * len(OBJECTS) * len(VERBS) * len(ENDINGS)) + 1)
        for verb in VERBS
        for colour in COLOURS
        for thing in OBJECTS
        for ending in ENDINGS
    ]
    order = np.random.default_rng(0).permutation(len(texts))[:count]
    return [texts[i] for i in order]


PROBE_COLOURS = {
    "red": ["crimson", "scarlet"],
    "green": ["emerald", "lime"],
    "blue": ["azure", "navy"],
    "purple": ["violet", "lilac"],
    "yellow": ["golden", "lemon"],
    "grey": ["gray", "silver"],
}
PROBE_VERBS = ["walk up to the", "approach the", "head over to the", "go to the"]


def synonym_probe(embedder, seeds: int = 5) -> dict:
    """Colour read from synonyms by a probe trained on the data's colour words (see above)."""
    import torch

    colours = list(PROBE_COLOURS)
    train = [(f"go to the {c} {o}", i) for i, c in enumerate(colours) for o in OBJECTS[:3]]
    test = [
        (f"{verb} {word} {thing}", colours.index(colour))
        for colour, words in PROBE_COLOURS.items()
        for word in words
        for thing in OBJECTS[:3]
        for verb in PROBE_VERBS
    ]
    x, y = torch.from_numpy(embedder.embed([t for t, _ in train])), torch.tensor([c for _, c in train])  # fmt: skip
    x_test = torch.from_numpy(embedder.embed([t for t, _ in test]))
    y_test = torch.tensor([c for _, c in test])
    accuracies, by_word = [], {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        probe = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], 64), torch.nn.GELU(), torch.nn.Linear(64, len(colours))
        )
        optimizer = torch.optim.Adam(probe.parameters(), 1e-2)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(probe(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        right = (probe(x_test).argmax(1) == y_test).numpy()
        accuracies.append(float(right.mean()))
        for (request, _), hit in zip(test, right):
            by_word.setdefault(request.split()[-2], []).append(bool(hit))
    return {
        "requests": len(test),
        "accuracy_mean": round(float(np.mean(accuracies)), 3),
        "accuracy_by_seed": [round(a, 3) for a in accuracies],
        "chance": round(1 / len(colours), 3),
        "accuracy_by_word": {w: round(float(np.mean(h)), 2) for w, h in by_word.items()},
    }


def rate(count: int, seconds: float) -> float:
    return round(count / max(seconds, 1e-9), 1)


def timed(function, repeat: int = 3) -> float:
    """Best of `repeat` wall times (the machine is shared)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/text.json")
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    from trainers.encoders import PretrainedTextEncoder
    from trainers.text import embedder_info, encode_request, load_embedder

    load_started = time.perf_counter()
    embedder = load_embedder("wordllama")
    load_seconds = time.perf_counter() - load_started
    texts = instruction_texts(args.texts)
    requests = texts[: args.requests]

    batch = timed(lambda: embedder.embed(texts))

    column = pa.chunked_array([pa.array(np.repeat(np.array(texts, dtype=object), 10))])
    condition = ConditionColumn("instruction", "text", "steps")

    def shard_text() -> None:
        info = combine_vocabulary([summarize_vocabulary(column, condition)], condition)
        condition_values(condition, column, info, "bench")

    shard = timed(shard_text)
    info = combine_vocabulary([summarize_vocabulary(column, condition)], condition)
    spec = info.model_dump() | {"embedder": embedder_info("wordllama").to_dict()}

    def train_start() -> None:
        PretrainedTextEncoder(spec, 128).embed_texts()

    start = timed(train_start)
    pretrained = spec | {"encoder": "wordllama"}
    tokens = spec | {"encoder": "tokens"}
    ask_one = timed(lambda: [encode_request(pretrained, text, 1) for text in requests])
    ask_batch = timed(lambda: embedder.embed(requests))
    ask_tokens = timed(lambda: [encode_request(tokens, text, 1) for text in requests])

    ceiling = rate(len(texts), batch)
    results = {
        "benchmark": "text",
        "embedder": {"name": embedder.name, "version": embedder.version, "load_s": load_seconds},
        "texts": len(texts),
        "requests": len(requests),
        "sentences_per_s": {
            "batch_call": ceiling,
            "shard": rate(len(texts), shard),
            "train_start": rate(len(texts), start),
            "ask_one_at_a_time": rate(len(requests), ask_one),
            "ask_batch_call": rate(len(requests), ask_batch),
            "ask_tokens": rate(len(requests), ask_tokens),
        },
        "ratios": {
            "train_start_vs_batch_call": round(rate(len(texts), start) / ceiling, 3),
            "shard_vs_batch_call": round(rate(len(texts), shard) / ceiling, 3),
            "ask_one_at_a_time_vs_batch_call": round(ask_batch / max(ask_one, 1e-9), 3),
        },
        "synonym_probe": synonym_probe(embedder),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 1),
        },
    }
    save_results(results, Path(args.out))


if __name__ == "__main__":
    main()
