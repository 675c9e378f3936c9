"""Storage, dataset versions, ingest, query and sharding.

The public entry points a user needs from Python:

    import engine
    steps = engine.scan("data/pendulum-rl")            # polars.LazyFrame over steps
    episodes = engine.scan_episodes("data/pendulum-rl")  # polars.LazyFrame over episodes
    episode = engine.episode_frames("data/pend-pix", 12)  # one episode's camera frames:
    episode.frames                                       # uint8 [steps, H, W, C]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.dataset import Dataset, DatasetError, open_dataset, scan, scan_episodes
    from engine.view import episode_frames

# name -> the module that defines it (every name of __all__)
_PUBLIC = {
    "Dataset": "engine.dataset",
    "DatasetError": "engine.dataset",
    "open_dataset": "engine.dataset",
    "scan": "engine.dataset",
    "scan_episodes": "engine.dataset",
    "episode_frames": "engine.view",
}
__all__ = [
    "Dataset",
    "DatasetError",
    "episode_frames",
    "open_dataset",
    "scan",
    "scan_episodes",
]


def __getattr__(name: str) -> Any:
    # Loaded on first use (PEP 562): `from engine import storage` in a command that never
    # reads a version (ingest, --help) must not pay for Polars.
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
