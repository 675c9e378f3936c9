"""Storage, dataset versions, ingest, query and sharding.

The public entry points a user needs from Python:

    import engine
    steps = engine.scan("data/pendulum-rl")            # polars.LazyFrame over steps
    episodes = engine.scan_episodes("data/pendulum-rl")  # polars.LazyFrame over episodes
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.dataset import Dataset, DatasetError, open_dataset, scan, scan_episodes

__all__ = ["Dataset", "DatasetError", "open_dataset", "scan", "scan_episodes"]


def __getattr__(name: str) -> Any:
    # Loaded on first use (PEP 562): `from engine import storage` in a command that never
    # reads a version (ingest, --help) must not pay for Polars.
    if name in __all__:
        return getattr(importlib.import_module("engine.dataset"), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
