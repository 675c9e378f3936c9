"""The feature statistics of a LeRobot export, as LeRobot's normalization reads them
(lerobot/datasets/compute_stats.py): per feature `min`, `max`, `mean`, `std`, `count` and
the quantiles `q01`, `q10`, `q50`, `q90`, `q99`.

Per episode they are exact (NumPy's linear quantiles) and stored in the episodes table
(`stats/<feature>/<stat>`); the dataset's (meta/stats.json) are aggregated from the
episodes' exactly as LeRobot's `aggregate_feature_stats` does: min of mins, max of maxes,
count-weighted mean, pooled variance, and for quantiles the min over episodes (q <= 50) or
the max (q > 50). Camera stats are per channel over every frame (LeRobot samples frames),
scaled to [0, 1] and shaped (3, 1, 1); uint8 pixels are counted in 256-bin histograms, from
which the same linear quantiles are exact.
"""

from __future__ import annotations

import numpy as np

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
QUANTILE_KEYS = tuple(f"q{int(round(q * 100)):02d}" for q in QUANTILES)

Stats = dict[str, np.ndarray]


def episode_stats(values: np.ndarray, starts: np.ndarray) -> list[Stats]:
    """Stats of each episode's rows of `values` ((rows,) or (rows, dim)); `starts` are the
    episodes' first rows plus the total at the end. Scalars give shape (1,) stats."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    lengths = np.diff(starts)
    heads = starts[:-1]
    minimum = np.minimum.reduceat(values, heads, axis=0)
    maximum = np.maximum.reduceat(values, heads, axis=0)
    mean = np.add.reduceat(values, heads, axis=0) / lengths[:, None]
    # Centred per episode: a sum of squares minus a squared sum loses digits.
    centred = values - np.repeat(mean, lengths, axis=0)
    std = np.sqrt(np.add.reduceat(centred * centred, heads, axis=0) / lengths[:, None])
    result = []
    for k, (start, end) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        quantiles = np.quantile(values[start:end], QUANTILES, axis=0)
        stats = {
            "min": minimum[k],
            "max": maximum[k],
            "mean": mean[k],
            "std": std[k],
            "count": np.array([end - start]),
        }
        stats.update(zip(QUANTILE_KEYS, quantiles, strict=True))
        result.append(stats)
    return result


def histogram_quantile(histogram: np.ndarray, q: float) -> float:
    """`np.quantile(values, q)` (linear) of integer values 0..255 given by their counts."""
    total = int(histogram.sum())
    position = q * (total - 1)
    low, high = int(np.floor(position)), int(np.ceil(position))
    cumulative = np.cumsum(histogram)
    value_low = int(np.searchsorted(cumulative, low, side="right"))
    value_high = int(np.searchsorted(cumulative, high, side="right"))
    return value_low + (position - low) * (value_high - value_low)


def image_stats(histograms: np.ndarray, frames: int) -> Stats:
    """Per-channel stats, scaled to [0, 1], from (channels, 256) pixel counts of `frames`
    frames; shapes (channels, 1, 1) as LeRobot stores image stats, count (1,) in frames."""
    levels = np.arange(256, dtype=np.float64)
    counts = histograms.sum(axis=1)
    present = histograms > 0
    minimum = np.argmax(present, axis=1).astype(np.float64)
    maximum = 255 - np.argmax(present[:, ::-1], axis=1).astype(np.float64)
    mean = (histograms * levels).sum(axis=1) / counts
    variance = (histograms * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / counts
    stats = {
        "min": minimum,
        "max": maximum,
        "mean": mean,
        "std": np.sqrt(variance),
    }
    for key, q in zip(QUANTILE_KEYS, QUANTILES, strict=True):
        stats[key] = np.array([histogram_quantile(h, q) for h in histograms])
    shaped = {key: (value / 255.0).reshape(-1, 1, 1) for key, value in stats.items()}
    shaped["count"] = np.array([frames])
    return shaped


def aggregate(stats_list: list[Stats]) -> Stats:
    """Episodes' stats of one feature into the dataset's (LeRobot's aggregate_feature_stats)."""
    means = np.stack([s["mean"] for s in stats_list])
    variances = np.stack([s["std"] ** 2 for s in stats_list])
    counts = np.stack([s["count"] for s in stats_list]).astype(np.float64)
    total = counts.sum(axis=0)
    while counts.ndim < means.ndim:
        counts = np.expand_dims(counts, axis=-1)
    mean = (means * counts).sum(axis=0) / total
    variance = ((variances + (means - mean) ** 2) * counts).sum(axis=0) / total
    result = {
        "min": np.min(np.stack([s["min"] for s in stats_list]), axis=0),
        "max": np.max(np.stack([s["max"] for s in stats_list]), axis=0),
        "mean": mean,
        "std": np.sqrt(variance),
        "count": total.astype(np.int64),
    }
    for key, q in zip(QUANTILE_KEYS, QUANTILES, strict=True):
        stacked = np.stack([s[key] for s in stats_list])
        result[key] = stacked.min(axis=0) if q <= 0.5 else stacked.max(axis=0)
    return result


def as_lists(stats: Stats) -> dict[str, list]:
    return {key: np.asarray(value).tolist() for key, value in stats.items()}
