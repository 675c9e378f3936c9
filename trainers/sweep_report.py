"""The report of a sweep (`hindsight ask --sweep`): does what the policy achieves follow
what was asked? Means with 95% intervals, the Spearman rank correlation of achieved against
requested, a warning when it does not follow, the printed table and the plot (ask.png).
Plain statistics on the rollouts' numbers; trainers/ask.py runs the rollouts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Achieved "follows" requested when their rank correlation is above this (and rises).
FOLLOWS_CORRELATION = 0.5


def is_return_to_go(column: str) -> bool:
    return "return_to_go" in column


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """Mean and a normal-approximation 95% interval of the mean."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, mean, mean
    half = 1.96 * float(array.std(ddof=1)) / math.sqrt(len(array))
    return mean, mean - half, mean + half


def wilson_ci95(successes: list[float]) -> tuple[float, float, float]:
    """A success rate and its Wilson score 95% interval (sound near 0 and 1 and for few
    episodes, where the normal approximation collapses to a point)."""
    n = len(successes)
    if n == 0:
        return math.nan, math.nan, math.nan
    rate = float(np.mean(successes))
    z = 1.959964
    center = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return rate, max(0.0, center - half), min(1.0, center + half)


# --- the sweep's references ------------------------------------------------------------------


def ranks(values: list[float]) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks (as Spearman's rho wants)."""
    _, inverse, counts = np.unique(
        np.asarray(values, float), return_inverse=True, return_counts=True
    )
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's over ranks); None for fewer than two points or
    a constant side, where it is undefined."""
    if len(xs) < 2:
        return None
    x, y = ranks(xs), ranks(ys)
    x, y = x - x.mean(), y - y.mean()
    scale = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / scale) if scale > 0 else None


def sweep_reference(results: list[dict[str, Any]], dataset_return: float | None) -> dict[str, Any]:
    """The references of a sweep's rows: the dataset's mean return, the rank correlation of
    achieved against requested, and whether achieved follows requested (correlation above
    0.5 and the highest request achieving more than the lowest; None for one row).

    Numbers are ordered by value; labels and sentences in the order they were requested."""
    requested = [row["requested"] for row in results]
    order = (
        requested if all(isinstance(v, float) for v in requested) else list(range(len(requested)))
    )
    achieved = [row["achieved_mean"] for row in results]
    correlation = spearman(order, achieved)
    follows = None
    if len(results) >= 2:
        lowest, highest = int(np.argmin(order)), int(np.argmax(order))
        rises = achieved[highest] > achieved[lowest]
        follows = correlation is not None and correlation > FOLLOWS_CORRELATION and rises
    return {
        "dataset_mean_return": dataset_return,
        "spearman": correlation,
        "follows_request": follows,
    }


def follow_warning(reference: dict[str, Any], column: str, metric: str) -> str | None:
    """A warning line when achieved does not follow requested; None when it does."""
    if reference["follows_request"] is not False:
        return None
    correlation = reference["spearman"]
    shown = "undefined (achieved is constant)" if correlation is None else f"{correlation:.2f}"
    return (
        f"warning: the achieved {metric} does not follow the requested {column} "
        f"(Spearman rank correlation {shown}; it should be above {FOLLOWS_CORRELATION} and the "
        "highest request should achieve more than the lowest)"
    )


def format_sweep(report: dict[str, Any]) -> list[str]:
    """The sweep as printed: one row per requested value, the references, the warning."""
    # As wide as the longest request (a sentence), so the numbers stay in their columns.
    width = max([12, *(len(str(row["requested"])) for row in report["results"])])
    lines = [f"{'requested':>{width}} {'achieved':>10}  95% CI"]
    for row in report["results"]:
        low, high = row["achieved_ci95"]
        requested = str(row["requested"])
        line = f"{requested:>{width}} {row['achieved_mean']:>10.2f}  [{low:.2f}, {high:.2f}]"
        if "return_mean" in row:  # --metric success: the return next to it
            r_low, r_high = row["return_ci95"]
            line += f"  return {row['return_mean']:.3f} [{r_low:.3f}, {r_high:.3f}]"
        if row.get("mission") and row["mission"] != row["requested"]:
            line += f"  (mission: {row['mission']})"
        lines.append(line)
    reference = report["reference"]
    if reference["dataset_mean_return"] is not None:
        lines.append(f"dataset mean return: {reference['dataset_mean_return']:.2f}")
    if reference["spearman"] is not None:
        lines.append(
            f"rank correlation of achieved vs requested (Spearman): {reference['spearman']:.2f}"
        )
    if report["warning"]:
        lines.append(report["warning"])
    return lines


def plot_sweep(report: dict[str, Any], dataset_return: dict[str, Any] | None, path: str) -> None:
    """Achieved vs requested, with the dataset's own return distribution marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    numeric = all(isinstance(r["requested"], float) for r in results)
    xs = [r["requested"] for r in results] if numeric else list(range(len(results)))
    means = np.array([r["achieved_mean"] for r in results])
    lows = means - np.array([r["achieved_ci95"][0] for r in results])
    highs = np.array([r["achieved_ci95"][1] for r in results]) - means
    figure, axis = plt.subplots(figsize=(6, 4.5))
    axis.errorbar(xs, means, yerr=[lows, highs], fmt="o-", capsize=4, label="achieved (95% CI)")
    if dataset_return and report["metric"] == "return":
        # The dataset's own returns: mean, 5th-95th percentiles, and the quantiles as a rug
        # on the right edge, so "above the data" is visible at a glance.
        quantiles = {float(q): v for q, v in (dataset_return.get("quantiles") or {}).items()}
        axis.axhline(
            dataset_return["mean"], color="grey", linestyle="--", label="dataset mean return"
        )
        for q, label in ((0.05, "dataset 5th / 95th percentile"), (0.95, None)):
            if q in quantiles:
                axis.axhline(quantiles[q], color="grey", linestyle=":", linewidth=1, label=label)
        if quantiles:
            axis.plot([1.0] * len(quantiles), list(quantiles.values()), "_", color="grey",
                      markersize=14, transform=axis.get_yaxis_transform(), clip_on=False,
                      label="dataset return quantiles")  # fmt: skip
        if numeric and is_return_to_go(report["condition"]):
            line = [min(xs), max(xs)]
            axis.plot(line, line, color="black", linewidth=0.8, label="achieved = requested")
    if not numeric:
        axis.set_xticks(xs, [str(r["requested"]) for r in results])
    axis.set_xlabel(f"requested {report['condition']}")
    axis.set_ylabel(f"achieved {report['metric']}")
    correlation = (report.get("reference") or {}).get("spearman")
    shown = f" (Spearman {correlation:.2f})" if correlation is not None else ""
    axis.set_title(f"{report['env']}: asking for {report['condition']}{shown}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
