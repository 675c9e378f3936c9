"""`progress`: how far through its episode each step is, as a float in [0, scale]."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from relabelers.base import Columns, Output, Params, Part, Relabeler
from schemas import steps as cols


class ProgressParams(Params):
    scale: float = Field(1.0, gt=0, description="Value of progress at the last step.")


class ProgressRelabeler(Relabeler):
    name = "progress"
    version = "0.1.0"
    Params = ProgressParams

    def reads(self) -> Columns:
        return Columns(steps=(cols.EPISODE_ID, cols.T))

    def writes(self) -> Columns:
        return Columns(steps=("progress",))

    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        bounds = cols.episode_boundaries(steps.column(cols.EPISODE_ID).to_numpy())
        lengths = np.diff(bounds)
        row_in_episode = np.arange(steps.num_rows) - np.repeat(bounds[:-1], lengths)
        last = np.maximum(np.repeat(lengths, lengths) - 1, 1)
        progress = self.params.scale * row_in_episode / last
        return Output(steps=pa.table({"progress": pa.array(progress.astype(np.float32))}))
