"""Storage, dataset versions, ingest, query and sharding.

The public entry points a user needs from Python:

    import engine
    steps = engine.scan("data/pendulum-rl")            # polars.LazyFrame over steps
    episodes = engine.scan_episodes("data/pendulum-rl")  # polars.LazyFrame over episodes
"""

from engine.dataset import Dataset, DatasetError, open_dataset, scan, scan_episodes

__all__ = ["Dataset", "DatasetError", "open_dataset", "scan", "scan_episodes"]
