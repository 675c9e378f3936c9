"""examples/pixel_experiment.py at a toy size: the pixel pipeline as a user runs it (collect
--frames, relabel, shard --frame-stack, train from frames alone, ask from rendered frames),
and the report's numbers against an independent computation from the collected data."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from examples import pixel_experiment


@pytest.mark.slow
def test_pixel_experiment_runs_and_reports_the_data_it_collected(tmp_path, ray_local):
    out, work = tmp_path / "pixel.json", tmp_path / "work"
    report = pixel_experiment.main(
        ["--out", str(out), "--work", str(work), "--seeds", "0", "1", "--episodes", "5",
         "--max-steps", "20", "--size", "16x16", "--frame-stack", "2", "--steps", "2",
         "--episodes-eval", "1"]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (result,) = report["results"]

    # The dataset's returns, recomputed from the collected steps' rewards.
    parts = sorted((work / "raw" / "base" / "steps").glob("*.parquet"))
    steps = pa.concat_tables(pq.read_table(p, columns=["episode_id", "reward"]) for p in parts)
    returns = steps.to_pandas().groupby("episode_id")["reward"].sum().to_numpy()
    assert len(returns) == 5
    assert math.isclose(result["dataset_return"]["mean"], float(returns.mean()), rel_tol=1e-5)
    high = float(np.quantile(returns, 0.95))
    assert result["requested_return_to_go"][-1] == pytest.approx(high, rel=1e-4)

    # The policies saw frames and only frames, stacked as the shards say.
    config = json.loads((work / "runs" / "rtg-0" / "config.json").read_text())
    frames = config["model"]["frames"]
    assert frames["inputs"] == "frames" and frames["frame_stack"] == 2
    assert frames["cameras"]["render"]["height"] == 16

    # Claims are t-intervals of the per-seed differences (n = 2: t = 12.706).
    per_seed = result["per_seed"]
    assert [row["seed"] for row in per_seed] == [0, 1]
    diffs = np.array([row["high"] - row["bc"] for row in per_seed])
    half = 12.706 * diffs.std(ddof=1) / math.sqrt(2)
    (versus_bc,) = [c for c in result["claims"] if c["claim"].endswith("behaviour cloning")]
    assert versus_bc["difference"]["ci95"] == pytest.approx(
        [diffs.mean() - half, diffs.mean() + half]
    )
    assert versus_bc["holds"] == (diffs.mean() - half > 0)
    # The unpaired wording: the high-return interval wholly above BC's.
    high, bc = (np.array([row[key] for row in per_seed]) for key in ("high", "bc"))
    high_low = high.mean() - 12.706 * high.std(ddof=1) / math.sqrt(2)
    bc_high = bc.mean() + 12.706 * bc.std(ddof=1) / math.sqrt(2)
    apart = result["intervals_apart"]["ask high return above behaviour cloning"]
    assert apart == (high_low > bc_high)
    # Pendulum's returns over 200 asked steps live in [-16.3 * 200, 0].
    assert all(-3300 <= row["bc"] <= 0 and -3300 <= row["high"] <= 0 for row in per_seed)
