"""`hindsight query`: pick a slice of a dataset by what was relabeled.

hindsight query data/pendulum-rl --where "skill = 'expert' AND return > -300" --episodes
hindsight query data/pendulum-rl --where "return_to_go > 400" --select episode_id,t,return_to_go --format csv
hindsight query data/pendulum-rl --where "skill = 'expert'" --out data/pendulum-experts
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from typing import Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine import query as engine_query
from engine import storage
from engine.dataset import open_dataset

TABLE_ROWS = 20
FORMAT_OF_SUFFIX = {
    "csv": "csv",
    "json": "json",
    "jsonl": "json",
    "ndjson": "json",
    "parquet": "parquet",
}


class QueryOptions(BaseModel):
    """Options of `hindsight query` (and of a `query` step in a job spec)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Dataset version to query: a local path or s3:// URI.")
    where: str | None = Field(
        default=None,
        description="Polars SQL condition over step or episode columns, e.g. "
        "\"skill = 'expert' AND return > -300\". On steps, an episode condition keeps "
        "every step of the matching episodes.",
    )
    episodes: bool = Field(
        default=False, description="Return episodes (one row each) instead of steps."
    )
    select: list[str] | None = Field(
        default=None,
        description="Columns to return (default: all columns of the level). On steps, "
        "episode columns are repeated on every step of their episode.",
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
        description="At most this many rows (with --out: this many episodes); reading "
        "stops once they are found.",
    )
    out: str | None = Field(
        default=None,
        description="Write the matching whole episodes, with every column, as a new "
        "self-contained dataset version at this URI.",
    )
    output_file: str | None = Field(
        default=None, description="Write csv/json/parquet results to this file, not stdout."
    )
    explain: bool = Field(
        default=False, description="Print the query plan and the bytes read to stderr."
    )

    @model_validator(mode="after")
    def _resolve_format(self) -> QueryOptions:
        """The output format, from --format or the --output-file's extension."""
        if self.output_file is not None:
            if self.format is None:
                suffix = self.output_file.rsplit(".", 1)[-1].lower()
                self.format = FORMAT_OF_SUFFIX.get(suffix)
                if self.format is None:
                    raise ValueError(
                        f"--output-file {self.output_file}: give --format csv|json|parquet "
                        "(the extension does not say which)"
                    )
            elif self.format == "table":
                raise ValueError("--format table prints to the terminal; drop --output-file")
        elif self.format is None:
            self.format = "table"
        return self


def run_query(options: QueryOptions, stdout: io.IOBase | None = None) -> dict:
    """Run one query; write its rows (or a new dataset) and return a summary."""
    stdout = stdout if stdout is not None else sys.stdout
    level = "episodes" if options.episodes else "steps"
    dataset = open_dataset(options.dataset)

    if options.out is not None:
        if options.select or options.episodes:
            raise ValueError(
                "--out writes whole episodes with every column; drop --select/--episodes"
            )
        if options.explain:
            plan = engine_query.plan_query(dataset, options.where, "steps", None)
            print(plan.describe(), file=sys.stderr)
        manifest, stats = engine_query.write_subset(
            dataset,
            options.where,
            options.out,
            command=_command_line(options),
            limit_episodes=options.limit,
        )
        if options.explain:
            print(f"read: {stats.to_dict()}", file=sys.stderr)
        summary = {
            "out": storage.normalize(options.out),
            "episodes": manifest.episodes,
            "steps": manifest.steps,
            "dataset_id": manifest.dataset_id,
            "bytes_read": stats.bytes,
        }
        print(
            f"wrote {manifest.episodes} episodes ({manifest.steps} steps) of {dataset.uri} "
            f"to {summary['out']} (dataset {manifest.dataset_id})",
            file=stdout,
        )
        return summary

    limit = options.limit
    if options.format == "table" and (limit is None or limit > TABLE_ROWS):
        limit = TABLE_ROWS
    result = engine_query.query(
        dataset, options.where, level=level, select=options.select, limit=limit
    )
    if options.explain:
        print(result.plan.describe(), file=sys.stderr)
        print(f"read: {result.stats.to_dict()}", file=sys.stderr)
    frame = result.frame
    summary = {"rows": frame.height, "bytes_read": result.stats.bytes}

    if options.format == "table":
        total = engine_query.count(dataset, options.where, level=level)
        summary["matching"] = total
        print(format_table(frame), file=stdout)
        shown = f"showing {frame.height} of " if frame.height < total else ""
        if shown and options.limit is not None and frame.height == options.limit:
            hint = f" (--limit {options.limit})"
        elif shown:
            hint = "; use --limit N --format csv|json|parquet for more"
        else:
            hint = ""
        print(f"{shown}{total:,} matching {level}{hint}", file=stdout)
        return summary

    if options.output_file is not None:
        with open(options.output_file, "wb") as handle:
            write_frame(frame, options.format, handle)
        return summary
    if options.format == "parquet" and getattr(stdout, "isatty", lambda: False)():
        raise ValueError("--format parquet is binary: use --output-file or redirect stdout")
    target = getattr(stdout, "buffer", stdout)
    write_frame(frame, options.format, target)
    target.flush()
    return summary


def format_table(frame: pl.DataFrame) -> str:
    """A readable table: a few elements of each vector, the terminal's width."""
    with pl.Config(
        tbl_rows=TABLE_ROWS,
        tbl_cols=-1,
        fmt_table_cell_list_len=3,
        fmt_str_lengths=40,
        tbl_width_chars=shutil.get_terminal_size((160, 24)).columns,
        tbl_hide_dataframe_shape=True,
    ):
        return str(frame)


def flatten_for_text(frame: pl.DataFrame) -> pl.DataFrame:
    """CSV has no nested values: vectors become "[a, b]", structs JSON text."""
    converted = []
    for name, dtype in frame.schema.items():
        column = pl.col(name)
        if isinstance(dtype, pl.Array | pl.List):
            column = pl.format("[{}]", column.cast(pl.List(pl.String)).list.join(", "))
        elif isinstance(dtype, pl.Struct):
            column = column.struct.json_encode()
        converted.append(column.alias(name))
    return frame.select(converted)


def write_frame(frame: pl.DataFrame, file_format: str, target) -> None:
    if file_format == "csv":
        flatten_for_text(frame).write_csv(target)
    elif file_format == "json":
        frame.write_ndjson(target)
    elif file_format == "parquet":
        frame.write_parquet(target, compression="zstd")
    else:
        raise ValueError(f"unknown format {file_format!r}")


def _command_line(options: QueryOptions) -> str:
    parts = ["hindsight query", options.dataset]
    if options.where:
        parts.append(f'--where "{options.where}"')
    if options.limit is not None:
        parts.append(f"--limit {options.limit}")
    parts.append(f"--out {options.out}")
    return " ".join(parts)


def _handle(args: argparse.Namespace) -> int:
    options = QueryOptions(
        dataset=args.dataset,
        where=args.where,
        episodes=args.episodes,
        select=[c.strip() for c in args.select.split(",") if c.strip()] if args.select else None,
        format=args.format,
        limit=args.limit,
        out=args.out,
        output_file=args.output_file,
        explain=args.explain,
    )
    run_query(options)
    return 0


def add_commands(subparsers) -> None:
    fields = QueryOptions.model_fields
    parser = subparsers.add_parser(
        "query",
        help="select steps or episodes by their (relabeled) columns",
        description="Select steps or episodes with a Polars SQL condition; print them, "
        "or write them as a new dataset version.",
    )
    parser.add_argument("dataset", help=fields["dataset"].description)
    parser.add_argument("--where", help=fields["where"].description)
    parser.add_argument("--episodes", action="store_true", help=fields["episodes"].description)
    parser.add_argument("--select", metavar="A,B,C", help=fields["select"].description)
    parser.add_argument(
        "--format",
        choices=["table", "csv", "json", "parquet"],
        help=fields["format"].description,
    )
    parser.add_argument("--limit", type=int, metavar="N", help=fields["limit"].description)
    parser.add_argument("--out", metavar="NEW_DATASET", help=fields["out"].description)
    parser.add_argument("--output-file", metavar="FILE", help=fields["output_file"].description)
    parser.add_argument("--explain", action="store_true", help=fields["explain"].description)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(handler=_handle)
