"""Where the `goals` relabeler reads achieved goals: a column (`achieved_goal`), a struct
field (`observation.achieved_goal`) or a slice of a vector column (`observation[0:2]`,
`observation.observation[3:5]`), checked against a schema before anything runs."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from relabelers.base import RelabelError
from schemas import steps as cols

_SLICE = re.compile(r"^(?P<path>[A-Za-z_][\w.]*)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass(frozen=True)
class AchievedSpec:
    """Where achieved goals live: a column path plus an optional slice of its vector."""

    path: str
    start: int | None = None
    stop: int | None = None

    @property
    def column(self) -> str:
        return self.path.split(".")[0]

    def __str__(self) -> str:
        """As written in `achieved=`: `observation.achieved_goal`, `observation[0:2]`."""
        if self.start is None and self.stop is None:
            return self.path
        start, stop = ("" if i is None else i for i in (self.start, self.stop))
        return f"{self.path}[{start}:{stop}]"

    def after_step(self) -> AchievedSpec | None:
        """The same field or slice of `next_observation` (the state after each step's
        action) when achieved goals are read from `observation`; else None."""
        if self.column != cols.OBSERVATION:
            return None
        path = cols.NEXT_OBSERVATION + self.path.removeprefix(cols.OBSERVATION)
        return AchievedSpec(path, self.start, self.stop)

    @classmethod
    def parse(cls, text: str) -> AchievedSpec:
        match = _SLICE.match(text.strip())
        if not match:
            raise RelabelError(
                f"relabeler 'goals': achieved={text!r} is not a column, a struct field "
                "(observation.achieved_goal) or a slice (observation[0:2])"
            )
        start, stop = match.group("start"), match.group("stop")
        return cls(
            match.group("path"),
            int(start) if start else None,
            int(stop) if stop else None,
        )

    def field_type(self, schema: pa.Schema) -> pa.DataType:
        """The Arrow type at `path` in `schema`; a clear error when there is none."""
        head, *rest = self.path.split(".")
        if head not in schema.names:
            raise RelabelError(
                f"relabeler 'goals': achieved={self.path!r}: the dataset has no column {head!r}; "
                f"columns: {', '.join(schema.names)}"
            )
        data_type = schema.field(head).type
        walked = head
        for name in rest:
            if not pa.types.is_struct(data_type):
                raise RelabelError(
                    f"relabeler 'goals': achieved={self.path!r}: {walked!r} is {data_type}, "
                    f"not a struct with a field {name!r}"
                )
            names = [data_type.field(i).name for i in range(data_type.num_fields)]
            if name not in names:
                raise RelabelError(
                    f"relabeler 'goals': achieved={self.path!r}: struct {walked!r} has no "
                    f"field {name!r}; fields: {', '.join(names)}"
                )
            data_type = data_type.field(name).type
            walked += "." + name
        return data_type

    def goal_dim(self, schema: pa.Schema) -> int:
        """Check the spec against a schema and return the goal dimension."""
        data_type = self.field_type(schema)
        if pa.types.is_fixed_size_list(data_type):
            width = data_type.list_size
        elif pa.types.is_floating(data_type) or pa.types.is_integer(data_type):
            width = 1
        else:
            raise RelabelError(
                f"relabeler 'goals': achieved={self.path!r} is {data_type}; expected a "
                "fixed-size list of numbers (a vector per step) or a number"
            )
        if self.start is None and self.stop is None:
            return width
        indices = range(width)[slice(self.start, self.stop)]
        if len(indices) == 0 or (self.stop is not None and self.stop > width):
            raise RelabelError(
                f"relabeler 'goals': achieved slice [{self.start}:{self.stop}] does not fit "
                f"{self.path!r}, which has {width} values per step"
            )
        return len(indices)

    def read(self, steps: pa.Table) -> np.ndarray:
        """The achieved goals of every step as contiguous float32 (rows, goal_dim)."""
        goal_dim = self.goal_dim(steps.schema)
        column = cols.column_by_path(steps, self.path)
        achieved = np.empty((len(column), goal_dim), dtype=np.float32)
        row = 0
        # Chunk by chunk, sliced first: never a copy of a whole observation column.
        for chunk in column.chunks:
            values = cols.arrow_to_numpy(chunk)
            values = values[:, None] if values.ndim == 1 else values
            achieved[row : row + len(values)] = values[:, slice(self.start, self.stop)]
            row += len(values)
        return achieved
