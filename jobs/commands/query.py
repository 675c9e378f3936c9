"""`hindsight query`: pick a slice of a dataset by what was relabeled."""

from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import CliPositionalArg

from engine import storage
from jobs.command import Command, Dataset, NewDataset, UserError
from schemas.manifest import printable

if TYPE_CHECKING:  # polars is imported where it is used: `hindsight --help` stays fast
    import polars as pl

TABLE_ROWS = 20
FORMAT_OF_SUFFIX = {
    "csv": "csv",
    "json": "json",
    "jsonl": "json",
    "ndjson": "json",
    "parquet": "parquet",
}


class Query(Command):
    """Select steps or episodes with a Polars SQL condition; print them, or write them as a
    new dataset version.

        hindsight query data/pendulum-rl --where "skill = 'expert' AND return > -300" --level episodes
        hindsight query data/pendulum-rl --where "return_to_go > 400" --select episode_id,t,return_to_go --format csv
        hindsight query data/pendulum-rl --where "skill = 'expert'" --output data/pendulum-experts
        hindsight query data/pendulum-rl --output data/pendulum-by-task --cluster-by task
    """

    name = "query"
    job = True

    input: CliPositionalArg[Dataset] = Field(
        description="Dataset version to query: a local path or s3:// URI."
    )
    where: str | None = Field(
        default=None,
        description="Polars SQL condition over step or episode columns, e.g. "
        "\"skill = 'expert' AND return > -300\". On steps, an episode condition keeps "
        "every step of the matching episodes.",
    )
    level: Literal["steps", "episodes"] = Field(
        default="steps", description="Rows to return: steps, or episodes (one row each)."
    )
    episodes: bool = Field(
        default=False, description="Return episodes: the same as --level episodes."
    )
    select: list[str] | None = Field(
        default=None,
        description="Columns to return (default: all columns of the level; a table shows "
        "what fits the terminal). On steps, episode columns are repeated on every step.",
        json_schema_extra={"metavar": "COLUMN,..."},
    )
    format: Literal["table", "csv", "json", "parquet"] | None = Field(
        default=None,
        description="table: readable, first rows only (the default); csv; json (one object "
        "per line); parquet (to --output-file or a redirected stdout). With --output-file, "
        "the default is the file's extension.",
    )
    limit: int | None = Field(
        default=None,
        ge=0,
        description="At most this many rows (with --output: this many episodes); reading "
        "stops once they are found.",
    )
    output: NewDataset | None = Field(
        default=None,
        description="Write the matching whole episodes, with every column, as a new "
        "self-contained dataset version here.",
    )
    cluster_by: list[str] | None = Field(
        default=None,
        description="With --output: store the episodes ordered by these episode columns "
        "(under new episode ids; the old ones in original_episode_id), so that later "
        "selections on them read only a few row groups.",
        json_schema_extra={"metavar": "COLUMN,..."},
    )
    output_file: str | None = Field(
        default=None, description="Write csv/json/parquet rows to this file, not stdout."
    )
    explain: bool = Field(
        default=False, description="Print the query plan and the bytes read to stderr."
    )

    @model_validator(mode="after")
    def _check_options(self) -> Query:
        """Options that contradict each other, before anything is read."""
        if self.episodes:
            self.level = "episodes"
        if self.output is not None:
            if self.select or self.level == "episodes":
                raise ValueError(
                    "--output writes whole episodes with every column; drop --select/--level/--episodes"
                )
            if self.limit == 0:
                raise ValueError("--limit 0 with --output keeps no episode")
        elif self.cluster_by is not None:
            raise ValueError("--cluster-by orders the episodes of a new version: give --output")
        self.output_format()
        return self

    def output_format(self) -> str:
        """--format, else the --output-file's extension, else table. Derived, not stored:
        the recorded command line keeps only the options the user gave."""
        if self.output_file is None:
            return self.format or "table"
        if self.format == "table":
            raise ValueError("--format table prints to the terminal; drop --output-file")
        if self.format is not None:
            return self.format
        suffix = self.output_file.rsplit(".", 1)[-1].lower()
        if suffix not in FORMAT_OF_SUFFIX:
            raise ValueError(
                f"--output-file {self.output_file}: give --format csv|json|parquet "
                "(the extension does not say which)"
            )
        return FORMAT_OF_SUFFIX[suffix]

    def run(self, stdout: Any = None) -> dict[str, Any]:
        """Run the query; print its rows (or write a new dataset) and return a summary."""
        from engine import query as engine_query
        from engine.dataset import open_dataset

        stdout = stdout if stdout is not None else sys.stdout
        file_format = self.output_format()
        dataset = open_dataset(self.input)
        if self.output is not None:
            if self.explain:
                plan = engine_query.plan_query(dataset, self.where, "steps", None)
                print(plan.describe(), file=sys.stderr)
            manifest, stats = engine_query.write_subset(
                dataset,
                self.where,
                self.output,
                command=self.history_line(),
                limit_episodes=self.limit,
                cluster_by=self.cluster_by,
            )
            if self.explain:
                print(f"read: {stats.to_dict()}", file=sys.stderr)
            return {
                "output": storage.normalize(self.output),
                "episodes": manifest.episodes,
                "steps": manifest.steps,
                "dataset_id": manifest.dataset_id,
                "bytes_read": stats.bytes,
                "input": dataset.uri,
            }

        limit = self.limit
        if file_format == "table" and (limit is None or limit > TABLE_ROWS):
            limit = TABLE_ROWS
        result = engine_query.query(
            dataset, self.where, level=self.level, select=self.select, limit=limit
        )
        if self.explain:
            print(result.plan.describe(), file=sys.stderr)
            print(f"read: {result.stats.to_dict()}", file=sys.stderr)
        frame = result.frame
        summary: dict[str, Any] = {"rows": frame.height, "bytes_read": result.stats.bytes}
        if file_format == "table":  # `report` shows it; `--json` shows only the counts
            summary["matching"] = engine_query.count(dataset, self.where, level=self.level)
            summary["table"] = frame
            return summary
        if self.output_file is not None:
            with open(self.output_file, "wb") as handle:
                write_frame(frame, file_format, handle)
            return summary
        if file_format == "parquet" and getattr(stdout, "isatty", lambda: False)():
            raise UserError("--format parquet is binary: use --output-file or redirect stdout")
        target = getattr(stdout, "buffer", stdout)
        write_frame(frame, file_format, target)  # the rows are the output
        target.flush()
        return summary

    def summary(self, result: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in result.items() if key != "table"}

    def report(self, result: dict[str, Any], seconds: float) -> str:
        if "output" in result:
            return (
                f"wrote {result['episodes']} episodes ({result['steps']} steps) of "
                f"{result['input']} to {result['output']} (dataset {result['dataset_id']})"
            )
        if "table" not in result:
            return ""  # the rows went to stdout or a file
        frame, total = result["table"], result["matching"]
        shown = f"showing {frame.height} of " if frame.height < total else ""
        if shown and self.limit is not None and frame.height == self.limit:
            hint = f" (--limit {self.limit})"
        elif shown:
            hint = "; use --limit N --format csv|json|parquet for more"
        else:
            hint = ""
        table = format_table(frame, selected=self.select is not None)
        return f"{table}\n{shown}{total:,} matching {self.level}{hint}"


def format_table(frame: pl.DataFrame, selected: bool = False) -> str:
    """A readable table: a few elements of each vector, the columns that fit the terminal
    (all of them when the user chose them with --select), control characters in strings
    shown escaped (`printable_frame`)."""
    import polars as pl

    width = shutil.get_terminal_size((160, 24)).columns
    hidden: list[str] = []
    if not selected:
        kept, used = [], 0
        for name in frame.columns:
            needed = min(max(len(name), 8), 24) + 3  # a column's share of a row, roughly
            if kept and used + needed > width:
                hidden.append(name)
                continue
            kept.append(name)
            used += needed
        frame = frame.select(kept)
    frame = printable_frame(frame)
    with pl.Config(
        tbl_rows=TABLE_ROWS,
        tbl_cols=-1,
        fmt_table_cell_list_len=3,
        fmt_str_lengths=40,
        tbl_width_chars=width,
        tbl_hide_dataframe_shape=True,
    ):
        text = str(frame)
    if hidden:
        names = ", ".join(printable(name) for name in hidden)
        text += f"\n(+{len(hidden)} more columns: {names}; choose with --select)"
    return text


def printable_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame with every string in it (nested ones too) and every column name passed
    through `printable`, so data cannot send escape codes to the terminal. For showing a
    table's few rows only: the walk over the values is in Python."""
    import polars as pl

    def holds_strings(dtype: pl.DataType) -> bool:
        if isinstance(dtype, pl.List | pl.Array):
            return holds_strings(dtype.inner)
        if isinstance(dtype, pl.Struct):
            return any(holds_strings(field.dtype) for field in dtype.fields)
        return dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return printable(value)
        if isinstance(value, list):
            return [clean(item) for item in value]
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        return value

    columns = []
    for name, dtype in frame.schema.items():
        series = frame[name]
        if holds_strings(dtype):
            if isinstance(dtype, pl.Categorical | pl.Enum):
                series, dtype = series.cast(pl.String), pl.String
            series = pl.Series(name, [clean(v) for v in series.to_list()], dtype=dtype)
        columns.append(series.alias(printable(name)))
    return pl.DataFrame(columns)


def flatten_for_text(frame: pl.DataFrame) -> pl.DataFrame:
    """CSV has no nested values: vectors become "[a, b]", structs JSON text."""
    import polars as pl

    converted = []
    for name, dtype in frame.schema.items():
        column = pl.col(name)
        if isinstance(dtype, pl.Array | pl.List):
            column = pl.format("[{}]", column.cast(pl.List(pl.String)).list.join(", "))
        elif isinstance(dtype, pl.Struct):
            column = column.struct.json_encode()
        converted.append(column.alias(name))
    return frame.select(converted)


def write_frame(frame: pl.DataFrame, file_format: str, target: Any) -> None:
    if file_format == "csv":
        flatten_for_text(frame).write_csv(target)
    elif file_format == "json":
        frame.write_ndjson(target)
    elif file_format == "parquet":
        frame.write_parquet(target, compression="zstd")
    else:
        raise ValueError(f"unknown format {file_format!r}")
