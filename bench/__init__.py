"""Benchmarks: each module runs as `python -m bench.<name> --out bench/results/<name>.json`.

Speeds are reported as ratios against a baseline measured in the same run on the same data.
"""

import json
from pathlib import Path
from typing import Any


def save_results(results: dict[str, Any], out: str | Path, echo: bool = True) -> None:
    """Write a benchmark's results as JSON at `out` (folders made), and print them."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    out.write_text(text)
    print(text if echo else f"wrote {out}", end="" if echo else "\n")
