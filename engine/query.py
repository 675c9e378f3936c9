"""Query a dataset version by its columns: a Polars SQL condition over step or episode columns.

    from engine.query import query
    result = query("data/pendulum-rl", where="skill = 'expert' AND return > -300")
    result.frame            # polars.DataFrame of the matching steps
    result.stats.bytes      # Parquet bytes this query had to read

Why not `engine.scan(uri).filter(...)`: a version is several column groups zipped row for
row, and Polars cannot push a filter through a horizontal concat, so that reads every byte
of every selected column. Here the condition is split into its AND-ed parts:

1. parts that use only episode columns run on the episodes table, which is small (one row
   per episode): they decide which episodes, and so which step rows, are candidates;
2. parts about steps run per data part on only the columns they use, read only for the
   candidate rows (whole Parquet row groups are skipped when no candidate falls in them),
   with episode columns broadcast to their steps where a condition mixes both;
3. the selected columns are read last, only for the rows that matched.

Episodes are contiguous runs of rows in every part (steps are sorted by episode_id, t), and
the episodes table gives each one's length, so the candidate rows of an episode are a range
and no `episode_id` needs to be read from the step files at all.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.dataset import Dataset, DatasetError, open_dataset, read_schema, unreadable
from engine.writer import (
    DEFAULT_PART_STEPS,
    VersionWriter,
    WrittenPart,
    base_manifest,
    check_new_output,
    part_slices,
)
from schemas import steps as cols
from schemas.manifest import ColumnGroup, Manifest

LEVELS = ("steps", "episodes")
_SQL_PREFIX = "SELECT * FROM t WHERE "
# Internal columns of the candidate-episodes table; never clash with user columns.
_PART = "__part"
_START = "__start"


class QueryError(ValueError):
    """A query the user must fix: a syntax error, an unknown column, a bad option."""


# ---------------------------------------------------------------- parsing the condition


def parse_where(where: str) -> pl.Expr:
    """A Polars expression from SQL text; a syntax error says where, with a caret."""
    try:
        return pl.sql_expr(where)
    except (pl.exceptions.SQLInterfaceError, pl.exceptions.SQLSyntaxError) as error:
        raise QueryError(_describe_syntax_error(where, error)) from None
    except pl.exceptions.PolarsError as error:
        raise QueryError(f"--where {where!r}: {error}") from None


def _describe_syntax_error(where: str, error: Exception) -> str:
    """Polars' expression parser does not say where it failed; its statement parser does."""
    message = str(error)
    try:
        pl.SQLContext(t=pl.LazyFrame()).execute(_SQL_PREFIX + where)
    except pl.exceptions.PolarsError as statement_error:
        text = str(statement_error).removeprefix("sql parser error: ")
        if "at Line: 1, Column: " in text:
            text, _, column_text = text.rpartition(" at Line: 1, Column: ")
            column = max(int(column_text) - len(_SQL_PREFIX), 1)
        elif "found: EOF" in text:
            column = len(where) + 1
        else:
            return f"--where has a syntax error: {message}\n  {where}"
        message = text
        return f"--where: syntax error at column {column}: {message}\n  {where}\n  {' ' * (column - 1)}^"
    return f"--where: {message}\n  {where}"


def conjuncts(expression: pl.Expr) -> list[pl.Expr]:
    """The AND-ed parts of a condition (`a AND (b AND c)` -> [a, b, c])."""
    inputs = expression.meta.pop()
    if len(inputs) == 2:
        for left, right in (inputs, inputs[::-1]):
            if (left & right).meta.eq(expression):
                return conjuncts(left) + conjuncts(right)
    return [expression]


# Expression nodes whose value for a row depends on other rows (Polars' serialized names).
_ACROSS_ROWS_NODES = {"Agg", "Len", "SubPlan", "Gather", "Slice", "Filter", "Sort", "SortBy"}
_ACROSS_ROWS_FUNCTIONS = (
    "Cum", "Shift", "Rank", "Diff", "PctChange", "Rolling", "Unique", "Mode", "Reverse",
    "FillNullWithStrategy", "Interpolate", "ArgSort", "ArgMin", "ArgMax", "Implode",
    "Quantile", "Correlation",
)  # fmt: skip


def across_rows(expression: pl.Expr) -> str | None:
    """What in a row condition depends on other rows (an aggregate, a shift, a window over
    more than one episode), or None. A window partitioned by episode_id is fine: episodes
    are never split across parts."""

    def find(node: object) -> str | None:
        if node == "Len":
            return "an aggregate (count)"
        if isinstance(node, list):
            return next((found for item in node if (found := find(item))), None)
        if not isinstance(node, dict):
            return None
        for key, value in node.items():
            if key in ("Column", "Literal"):
                continue
            if key == "Over":
                if value.get("partition_by") == [{"Column": cols.EPISODE_ID}]:
                    continue
                return "a window over more than one episode"
            if key in _ACROSS_ROWS_NODES:
                return f"an aggregate ({key})"
            if key == "function" and isinstance(value, dict | str):
                name = value if isinstance(value, str) else next(iter(value), "")
                if name.startswith(_ACROSS_ROWS_FUNCTIONS):
                    return f"a function of other rows ({name})"
            if found := find(value):
                return found
        return None

    return find(json.loads(expression.meta.serialize(format="json")))


def _all(expressions: Sequence[pl.Expr]) -> pl.Expr | None:
    if not expressions:
        return None
    combined = expressions[0]
    for expression in expressions[1:]:
        combined = combined & expression
    return combined


@dataclass(frozen=True)
class Plan:
    """What a query reads and how it filters, decided before any data is read."""

    level: str
    select: list[str]
    episode_condition: pl.Expr | None = None  # runs on the episodes table
    row_condition: pl.Expr | None = None  # runs on candidate rows of `level`
    row_step_columns: list[str] = field(default_factory=list)  # read for row_condition
    row_episode_columns: list[str] = field(default_factory=list)  # broadcast for it
    select_episode_columns: list[str] = field(default_factory=list)  # broadcast to steps

    def describe(self) -> str:
        lines = [f"level: {self.level}"]
        if self.episode_condition is not None:
            lines.append(f"on the episodes table: {self.episode_condition}")
        if self.row_condition is not None:
            lines.append(
                f"on candidate {self.level} rows: {self.row_condition} "
                f"(reads {', '.join(self.row_step_columns + self.row_episode_columns) or 'nothing'})"
            )
        lines.append(f"then reads: {', '.join(self.select)}")
        return "\n".join(lines)


def _unknown_columns_error(names: Sequence[str], dataset: Dataset, what: str) -> QueryError:
    return QueryError(
        f"{dataset.uri}: unknown column(s) {', '.join(map(repr, names))} in {what}.\n"
        f"  step columns: {', '.join(dataset.columns('steps'))}\n"
        f"  episode columns: {', '.join(dataset.columns('episodes'))}"
    )


def plan_query(
    dataset: Dataset,
    where: str | None,
    level: str = "steps",
    select: Sequence[str] | None = None,
) -> Plan:
    """Split the condition between the episodes table and the rows; check every column.

    On steps, a column that exists at both levels (episode_id) is read from the steps; an
    episode-only column in a condition or in `select` is broadcast to the episode's steps.
    """
    if level not in LEVELS:
        raise QueryError(f"level must be one of {LEVELS}, not {level!r}")
    step_columns = set(dataset.columns("steps"))
    episode_columns = set(dataset.columns("episodes"))
    level_columns = step_columns if level == "steps" else episode_columns
    selected = list(dict.fromkeys(select)) if select else dataset.columns(level)

    if level == "episodes":
        unknown = [c for c in selected if c not in episode_columns]
        if unknown:
            hint = [c for c in unknown if c in step_columns]
            error = _unknown_columns_error(unknown, dataset, "--select of an episodes query")
            if hint:
                error = QueryError(f"{error}\n  {hint} are step columns: drop --episodes")
            raise error
    else:
        unknown = [c for c in selected if c not in step_columns | episode_columns]
        if unknown:
            raise _unknown_columns_error(unknown, dataset, "--select")
    select_episode_columns = [c for c in selected if c not in level_columns]

    if not where or not where.strip():
        return Plan(level=level, select=selected, select_episode_columns=select_episode_columns)

    expression = parse_where(where)
    referenced = list(dict.fromkeys(expression.meta.root_names()))
    unknown = [c for c in referenced if c not in step_columns | episode_columns]
    if unknown:
        raise _unknown_columns_error(unknown, dataset, f"--where {where!r}")
    if level == "episodes":
        steps_only = [c for c in referenced if c not in episode_columns]
        if steps_only:
            raise QueryError(
                f"--where {where!r} uses step column(s) {steps_only} in an episodes query; "
                f"episode columns: {', '.join(dataset.columns('episodes'))}. "
                "Drop --episodes to get the matching steps."
            )
        return Plan(level=level, select=selected, episode_condition=expression)

    def uses_only_episode_columns(part: pl.Expr) -> bool:
        names = set(part.meta.root_names())
        return bool(names) and all(
            name in episode_columns and (name not in step_columns or name == cols.EPISODE_ID)
            for name in names
        )

    parts = conjuncts(expression)
    episode_parts = [p for p in parts if uses_only_episode_columns(p)]
    row_parts = [p for p in parts if not uses_only_episode_columns(p)]
    for part in row_parts:
        across = across_rows(part)
        if across:
            raise QueryError(
                f"--where {where!r}: {across} over step rows is not supported: steps are "
                "filtered part by part, so it would not be computed over the whole dataset. "
                "Aggregates over episode columns work (they run on the whole episodes "
                "table), and so do windows within an episode (`... OVER (PARTITION BY "
                "episode_id)`); otherwise compute the value first, e.g. "
                "engine.scan(uri).select(pl.col('reward').mean()).collect()."
            )
    row_names = list(dict.fromkeys(n for p in row_parts for n in p.meta.root_names()))
    return Plan(
        level=level,
        select=selected,
        episode_condition=_all(episode_parts),
        row_condition=_all(row_parts),
        row_step_columns=[c for c in row_names if c in step_columns],
        row_episode_columns=[c for c in row_names if c not in step_columns],
        select_episode_columns=select_episode_columns,
    )


# ---------------------------------------------------------------- reading only what is needed


# Reads of several parts run in parallel on Polars' threads; their counts meet here.
_STATS_LOCK = threading.Lock()


@dataclass
class ReadStats:
    """What a query read: Parquet column chunks (compressed bytes, as stored) and footers."""

    files: int = 0
    row_groups: int = 0
    row_groups_skipped: int = 0
    bytes: int = 0
    parts_skipped: int = 0

    def add(self, **counts: int) -> None:
        with _STATS_LOCK:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def count_file(self, metadata: pq.FileMetaData, groups: np.ndarray, columns: list[str]) -> None:
        """Count a read of the row groups `groups` of `columns` from one file."""
        wanted = set(columns)
        chunk_bytes = 0
        for index in groups:
            row_group = metadata.row_group(int(index))
            for j in range(row_group.num_columns):
                chunk = row_group.column(j)
                if chunk.path_in_schema.split(".")[0] in wanted:
                    chunk_bytes += chunk.total_compressed_size
        self.add(
            files=1,
            row_groups=len(groups),
            row_groups_skipped=metadata.num_row_groups - len(groups),
            bytes=metadata.serialized_size + chunk_bytes,
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def row_group_selection(
    rows: np.ndarray, row_group_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For sorted row positions in a file whose row groups start at `row_group_offsets`
    (with the total row count last): the row groups that hold any of them, and each row's
    position in those row groups read one after another."""
    group_of_row = np.searchsorted(row_group_offsets, rows, side="right") - 1
    groups = np.unique(group_of_row)
    sizes = np.diff(row_group_offsets)[groups]
    first_row_read = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    slot = np.searchsorted(groups, group_of_row)
    positions = rows - row_group_offsets[group_of_row] + first_row_read[slot]
    return groups, positions


def _not_aligned(uri: str, num_rows: int, rows: np.ndarray) -> DatasetError:
    return DatasetError(
        f"{uri}: has {num_rows} rows, the episodes table says rows "
        f"{rows.min()}..{rows.max()}; the column groups of this version are not aligned"
    )


def read_rows(uri: str, columns: list[str], rows: np.ndarray, stats: ReadStats) -> pl.DataFrame:
    """`columns` of one Parquet file at the sorted row positions `rows`: the row groups that
    hold them, in one read, then the rows taken from those (see `row_group_selection`).

    The footer is parsed here, not up front, so the footers of the parts a query reads
    together are parsed in parallel too (with small row groups they are not small)."""
    fs, path = storage.filesystem(uri)
    try:
        with pq.ParquetFile(
            path, filesystem=fs, pre_buffer=True, page_checksum_verification=True
        ) as parquet:
            metadata = parquet.metadata
            sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            if rows[-1] >= offsets[-1]:
                raise _not_aligned(uri, int(offsets[-1]), rows)
            groups, positions = row_group_selection(rows, offsets)
            stats.count_file(metadata, groups, columns)
            table = parquet.read_row_groups(groups.tolist(), columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise unreadable(uri, error) from error
    return pl.from_arrow(table.take(pa.array(positions)))


class PartReader:
    """Reads chosen columns of one part at one level, from whichever groups hold them.

    Whole parts are Polars scans. Chosen rows are read as whole Parquet row groups (the
    smallest unit a Parquet reader can skip), only those that hold a chosen row, and the
    rows are then taken from them: one read per file, however scattered the rows are.
    Those reads are Python functions that Polars runs on its threads (`pl.defer`); an
    exception must not cross Polars' threads (the process can abort at exit while other
    reads still run), so each read keeps its error and `collect` raises it afterwards.
    """

    def __init__(self, dataset: Dataset, level: str, stats: ReadStats):
        self.dataset = dataset
        self.level = level
        self.stats = stats
        self.group_of = {
            f.name: group
            for group in dataset.manifest.groups
            for f in getattr(group, f"{level}_columns")
        }
        self._schemas: dict[str, pl.Schema] = {}
        self._errors: list[Exception] = []
        self._files_of: dict[int, list[str]] = {}  # id of a frame from `scan` -> its files

    def scan(
        self, index: int, columns: Sequence[str], rows: np.ndarray | None = None
    ) -> pl.LazyFrame:
        """`columns` of part `index` at the sorted row positions `rows` (None: all rows)."""
        by_group: dict[str, list[str]] = {}
        for column in dict.fromkeys(columns):
            by_group.setdefault(self.group_of[column].name, []).append(column)
        frames, uris = [], []
        for group_columns in by_group.values():
            group = self.group_of[group_columns[0]]
            data_file = getattr(group, f"{self.level}_files")[index]
            uris.append(storage.join(group.root, data_file.path))
            frames.append(self._scan(uris[-1], data_file.rows, group, group_columns, rows))
        frame = pl.concat(frames, how="horizontal") if len(frames) > 1 else frames[0]
        frame = frame.select(list(dict.fromkeys(columns)))
        self._files_of[id(frame)] = uris
        return frame

    def collect(self, frames: Sequence[pl.LazyFrame]) -> list[pl.DataFrame]:
        """Collect scans of several parts in one call, so Polars runs them in parallel;
        then raise the first error any read met, naming its files."""
        try:
            collected = pl.collect_all(frames)
        except pl.exceptions.PolarsError as error:
            raise self._locate(frames, error) from error
        if self._errors:
            error, self._errors = self._errors[0], []
            raise error
        return collected

    def _locate(self, frames: Sequence[pl.LazyFrame], error: Exception) -> DatasetError:
        """Polars does not say which file a failed read came from: read the frames one by
        one (only after a failure) to name the files of the part that fails."""
        for frame in frames:
            try:
                frame.collect()
            except pl.exceptions.PolarsError:
                files = self._files_of.get(id(frame), [self.dataset.uri])
                return unreadable(", ".join(files), error)
        return unreadable(self.dataset.uri, error)

    def read(
        self, index: int, columns: Sequence[str], rows: np.ndarray | None = None
    ) -> pl.DataFrame:
        return self.collect([self.scan(index, columns, rows)])[0]

    def _schema(self, group: ColumnGroup) -> pl.Schema:
        """The Polars schema of a group's files at this level (all its parts share it).

        Read from the first part's footer once per reader; like the manifest, this is the
        version's description, not counted in `stats`."""
        if group.name not in self._schemas:
            first = getattr(group, f"{self.level}_files")[0]
            empty = read_schema(storage.join(group.root, first.path)).empty_table()
            self._schemas[group.name] = pl.from_arrow(empty).schema
        return self._schemas[group.name]

    def _scan(
        self,
        uri: str,
        num_rows: int,
        group: ColumnGroup,
        columns: list[str],
        rows: np.ndarray | None,
    ) -> pl.LazyFrame:
        if rows is None:
            fs, path = storage.filesystem(uri)
            try:
                metadata = pq.read_metadata(path, filesystem=fs)
            except (OSError, pa.ArrowException) as error:
                raise unreadable(uri, error) from error
            self.stats.count_file(metadata, np.arange(metadata.num_row_groups), columns)
            options = storage.polars_storage_options(uri)
            return pl.scan_parquet(uri, storage_options=options).select(columns)
        if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
            raise _not_aligned(uri, num_rows, rows)
        schema = pl.Schema({name: self._schema(group)[name] for name in columns})
        if not len(rows):
            return pl.LazyFrame(schema=schema)

        def read() -> pl.DataFrame:
            try:
                return read_rows(uri, columns, rows, self.stats)
            except Exception as error:  # raised by `collect`, on the caller's thread
                self._errors.append(error)
                return pl.DataFrame(schema=schema).clear(len(rows))

        return pl.defer(read, schema=schema, validate_schema=True)


def _episode_table(
    dataset: Dataset, columns: Sequence[str], stats: ReadStats, parts: Sequence[int]
) -> pl.DataFrame:
    """Episodes of `parts` with `columns`, their part and first step row within the part."""
    reader = PartReader(dataset, "episodes", stats)
    wanted = list(dict.fromkeys([cols.EPISODE_ID, cols.LENGTH, *columns]))
    parts = list(parts)
    frames = reader.collect([reader.scan(index, wanted) for index in parts])
    with_rows = []
    for index, frame in zip(parts, frames):
        frame = frame.sort(cols.EPISODE_ID)
        lengths = frame[cols.LENGTH].to_numpy()
        expected = dataset.manifest.parts[index].steps
        if int(lengths.sum()) != expected:
            raise DatasetError(
                f"{dataset.uri}: part {index} holds {expected} steps but its episodes' lengths "
                f"add up to {int(lengths.sum())}; validate the dataset"
            )
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        with_rows.append(
            frame.with_columns(
                pl.lit(index, dtype=pl.Int64).alias(_PART), pl.Series(_START, starts)
            )
        )
    return pl.concat(with_rows) if with_rows else pl.DataFrame()


def _episode_rows(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the given episodes (sorted ranges) and, per row, which episode it is."""
    lengths = lengths.astype(np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first_row_of_owner = np.repeat(starts.astype(np.int64) - np.cumsum(lengths) + lengths, lengths)
    rows = first_row_of_owner + np.arange(int(lengths.sum()), dtype=np.int64)
    return rows, owner


# ---------------------------------------------------------------- running a query

# Parts are read together (Polars decodes them in parallel) until their candidate rows add
# up to this many parts' worth: whole parts go 4 at a time, a sparse selection from many
# parts at once. Memory holds one batch; a `limit` is checked in between.
PARTS_PER_BATCH = 4


@dataclass
class QueryResult:
    frame: pl.DataFrame
    plan: Plan
    stats: ReadStats


@dataclass
class _PartMatch:
    """The matching rows of one part, which candidate episode owns each, and the step
    columns already read for the condition (at exactly those rows)."""

    index: int
    candidates: pl.DataFrame
    rows: np.ndarray
    owner: np.ndarray
    condition_steps: pl.DataFrame | None = None


def _open(dataset: Dataset | str) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else open_dataset(dataset)


def _cannot_evaluate(condition: pl.Expr, error: Exception) -> QueryError:
    """A condition that parses but does not fit the columns' types (`return > 'abc'`)."""
    return QueryError(f"--where: cannot evaluate {condition}: {str(error).splitlines()[0]}")


def _candidate_episodes(
    dataset: Dataset, plan: Plan, extra_columns: Sequence[str], stats: ReadStats
) -> pl.DataFrame:
    episode_columns = set(dataset.columns("episodes"))
    needed = [
        *(plan.episode_condition.meta.root_names() if plan.episode_condition is not None else []),
        *[c for c in extra_columns if c in episode_columns],
    ]
    episodes = _episode_table(dataset, needed, stats, range(dataset.num_parts))
    if plan.episode_condition is not None and episodes.height:
        try:
            episodes = episodes.filter(plan.episode_condition)
        except pl.exceptions.PolarsError as error:
            raise _cannot_evaluate(plan.episode_condition, error) from None
    return episodes


def _match_parts(
    dataset: Dataset,
    plan: Plan,
    indices: Sequence[int],
    candidates: pl.DataFrame,
    reader: PartReader,
) -> list[_PartMatch]:
    """Apply the row condition to the candidate rows of some parts, read together."""
    matches = []
    for index in indices:
        part_candidates = candidates.filter(pl.col(_PART) == index)
        if not part_candidates.height:
            reader.stats.parts_skipped += 1
            continue
        rows, owner = _episode_rows(
            part_candidates[_START].to_numpy(), part_candidates[cols.LENGTH].to_numpy()
        )
        matches.append(_PartMatch(index, part_candidates, rows, owner))
    if plan.row_condition is None:
        return matches
    whole_parts = plan.episode_condition is None
    if plan.row_step_columns:
        frames = reader.collect(
            [
                reader.scan(m.index, plan.row_step_columns, None if whole_parts else m.rows)
                for m in matches
            ]
        )
    else:
        frames = [pl.DataFrame() for _ in matches]
    for match, frame in zip(matches, frames):
        values = frame
        if plan.row_episode_columns:
            broadcast = match.candidates.select(plan.row_episode_columns)[match.owner]
            values = pl.concat([values, broadcast], how="horizontal") if values.width else broadcast
        if not values.width:
            values = pl.DataFrame({"__row": match.rows})
        try:
            keep = values.select(plan.row_condition.fill_null(False).alias("keep")).to_series()
        except pl.exceptions.PolarsError as error:
            raise _cannot_evaluate(plan.row_condition, error) from None
        keep_array = np.full(len(match.rows), bool(keep[0])) if keep.len() == 1 else keep.to_numpy()
        match.rows = match.rows[keep_array]
        match.owner = match.owner[keep_array]
        match.condition_steps = frame.filter(pl.Series(keep_array)) if frame.width else None
    return matches


def _batches(
    dataset: Dataset, candidates: pl.DataFrame, limit: int | None = None
) -> list[list[int]]:
    """Every part, in order, cut into batches of at most PARTS_PER_BATCH largest parts'
    worth of candidate rows, or `limit` rows (a part with more is a batch of its own)."""
    rows = np.zeros(dataset.num_parts, dtype=np.int64)
    if candidates.height:
        per_part = candidates.group_by(_PART).agg(pl.col(cols.LENGTH).sum())
        rows[per_part[_PART].to_numpy()] = per_part[cols.LENGTH].to_numpy()
    budget = PARTS_PER_BATCH * max((part.steps for part in dataset.manifest.parts), default=0)
    if limit is not None:
        budget = min(budget, limit)
    batches: list[list[int]] = []
    total = 0
    for index, part_rows in enumerate(rows.tolist()):
        if not batches or (total + part_rows > budget and total > 0):
            batches.append([])
            total = 0
        batches[-1].append(index)
        total += part_rows
    return batches


def query(
    dataset: Dataset | str,
    where: str | None = None,
    *,
    level: str = "steps",
    select: Sequence[str] | None = None,
    limit: int | None = None,
) -> QueryResult:
    """Rows of `level` matching `where` (Polars SQL), with the `select` columns.

    On steps, a condition on episode columns keeps all steps of the matching episodes
    (a semi-join on episode_id); episode columns in `select` are repeated on every step.
    `limit` stops reading as soon as enough rows matched (in episode_id, t order).
    """
    dataset = _open(dataset)
    plan = plan_query(dataset, where, level, select)
    stats = ReadStats()
    if level == "episodes":
        frame = _candidate_episodes(dataset, plan, plan.select, stats)
        frame = frame.select(plan.select) if frame.height else _empty(dataset, plan)
        return QueryResult(frame.head(limit) if limit is not None else frame, plan, stats)

    candidates = _candidate_episodes(
        dataset, plan, [*plan.row_episode_columns, *plan.select_episode_columns], stats
    )
    reader = PartReader(dataset, "steps", stats)
    step_select = [c for c in plan.select if c not in plan.select_episode_columns]
    pieces: list[pl.DataFrame] = []
    found = 0
    # Only when the episodes decide alone are candidate rows the rows a limit counts.
    rows_limit = limit if plan.row_condition is None else None
    for batch in _batches(dataset, candidates, rows_limit):
        if (limit is not None and found >= limit) or not candidates.height:
            stats.parts_skipped += len(batch)
            continue
        matches = _match_parts(dataset, plan, batch, candidates, reader)
        scans = []
        for match in matches:
            if limit is not None:
                keep = max(limit - found, 0)
                match.rows, match.owner = match.rows[:keep], match.owner[:keep]
                if match.condition_steps is not None:
                    match.condition_steps = match.condition_steps.head(keep)
            found += len(match.rows)
            already = match.condition_steps.columns if match.condition_steps is not None else []
            to_read = [c for c in step_select if c not in already]
            whole = len(match.rows) == dataset.manifest.parts[match.index].steps
            if to_read and len(match.rows):
                scans.append(reader.scan(match.index, to_read, None if whole else match.rows))
            else:
                scans.append(pl.LazyFrame())
        for match, frame in zip(matches, reader.collect(scans)):
            if not len(match.rows):
                continue
            columns = [frame] if frame.width else []
            if match.condition_steps is not None:
                columns.append(match.condition_steps.select(c for c in already if c in step_select))
            if plan.select_episode_columns:
                columns.append(match.candidates.select(plan.select_episode_columns)[match.owner])
            columns = [c for c in columns if c.width]
            piece = pl.concat(columns, how="horizontal") if len(columns) > 1 else columns[0]
            pieces.append(piece.select(plan.select))
    frame = pl.concat(pieces) if pieces else _empty(dataset, plan)
    return QueryResult(frame, plan, stats)


def _empty(dataset: Dataset, plan: Plan) -> pl.DataFrame:
    """A zero-row frame with the right schema (columns of the level win over the other)."""
    other = "episodes" if plan.level == "steps" else "steps"
    schema = {f.name: f.type for f in dataset.arrow_schema(other)}
    schema.update({f.name: f.type for f in dataset.arrow_schema(plan.level)})
    return pl.from_arrow(pa.schema([(c, schema[c]) for c in plan.select]).empty_table())


def count(dataset: Dataset | str, where: str | None = None, *, level: str = "steps") -> int:
    """How many rows match, reading only the columns the condition uses."""
    dataset = _open(dataset)
    plan = plan_query(dataset, where, level, [cols.EPISODE_ID])
    if level == "episodes" or plan.row_condition is None:
        candidates = _candidate_episodes(dataset, plan, [], ReadStats())
        if level == "episodes":
            return candidates.height
        return int(candidates[cols.LENGTH].sum()) if candidates.height else 0
    return matching_episodes(dataset, where, with_counts=True)[1]


def matching_episodes(
    dataset: Dataset | str, where: str | None, *, with_counts: bool = False
) -> pl.DataFrame | tuple[pl.DataFrame, int]:
    """Episodes (episode_id) with at least one step matching `where`, in order; with
    `with_counts` also the number of matching steps."""
    dataset = _open(dataset)
    plan = plan_query(dataset, where, "steps", [cols.EPISODE_ID])
    stats = ReadStats()
    candidates = _candidate_episodes(dataset, plan, plan.row_episode_columns, stats)
    if plan.row_condition is None or not candidates.height:
        steps = int(candidates[cols.LENGTH].sum()) if candidates.height else 0
        selected = candidates.select(cols.EPISODE_ID) if candidates.height else pl.DataFrame()
        return (selected, steps) if with_counts else selected
    reader = PartReader(dataset, "steps", stats)
    kept = []
    steps = 0
    for batch in _batches(dataset, candidates):
        for match in _match_parts(dataset, plan, batch, candidates, reader):
            steps += len(match.rows)
            kept.append(match.candidates[np.unique(match.owner)].select(cols.EPISODE_ID))
    selected = pl.concat(kept) if kept else pl.DataFrame()
    return (selected, steps) if with_counts else selected


# ---------------------------------------------------------------- writing a subset


def iter_episodes(
    dataset: Dataset | str, episode_ids: Sequence[int] | np.ndarray, stats: ReadStats | None = None
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Every step and episode column of the given whole episodes, one source part at a time
    (sorted by episode_id, with the dataset's Arrow types). Memory holds one batch (see
    PARTS_PER_BATCH) of chosen rows, read together, plus the row groups of the files being
    decoded at that moment (one file per Polars thread).

    Parts whose [min_episode_id, max_episode_id] in the manifest holds none of the ids are
    not opened.
    """
    dataset = _open(dataset)
    stats = stats if stats is not None else ReadStats()
    wanted = np.unique(np.asarray(episode_ids, dtype=np.int64))
    schemas = {level: dataset.arrow_schema(level) for level in LEVELS}
    parts = []
    for index, part in enumerate(dataset.manifest.parts):
        low, high = np.searchsorted(wanted, [part.min_episode_id, part.max_episode_id + 1])
        if low == high:
            stats.parts_skipped += 1
        else:
            parts.append(index)
    chosen = _episode_table(dataset, [], stats, parts)
    if chosen.height:
        chosen = chosen.filter(pl.col(cols.EPISODE_ID).is_in(pl.Series(wanted).implode()))
    step_reader = PartReader(dataset, "steps", stats)
    episode_reader = PartReader(dataset, "episodes", stats)
    for batch in _batches(dataset, chosen):
        step_scans, episode_frames = [], []
        for index in batch:
            part_chosen = chosen.filter(pl.col(_PART) == index) if chosen.height else chosen
            if not part_chosen.height:
                continue
            rows, _ = _episode_rows(
                part_chosen[_START].to_numpy(), part_chosen[cols.LENGTH].to_numpy()
            )
            whole = len(rows) == dataset.manifest.parts[index].steps
            step_scans.append(
                step_reader.scan(index, dataset.columns("steps"), None if whole else rows)
            )
            episodes = episode_reader.read(index, dataset.columns("episodes"))
            ids = part_chosen[cols.EPISODE_ID].implode()
            episode_frames.append(
                episodes.filter(pl.col(cols.EPISODE_ID).is_in(ids)).sort(cols.EPISODE_ID)
            )
        for steps, episodes in zip(step_reader.collect(step_scans), episode_frames):
            yield (
                steps.to_arrow().cast(schemas["steps"]),
                episodes.to_arrow().cast(schemas["episodes"]),
            )


def write_subset(
    dataset: Dataset | str,
    where: str | None,
    out_uri: str,
    *,
    command: str,
    limit_episodes: int | None = None,
    part_steps: int = DEFAULT_PART_STEPS,
) -> tuple[Manifest, ReadStats]:
    """A new self-contained version (one `base` group, every column) of the whole episodes
    with at least one step matching `where`; its history records the query and the parent.

    Written part by part as the episodes are read, in parts of about `part_steps` steps, so
    memory stays bounded however large the subset is. A failure leaves nothing behind.
    """
    dataset = _open(dataset)
    check_new_output(out_uri)
    selected = matching_episodes(dataset, where)
    if not selected.height:
        raise QueryError(
            f"{dataset.uri}: no episode matches --where {where!r}; nothing written to {out_uri}"
        )
    episode_ids = selected[cols.EPISODE_ID].to_numpy()
    if limit_episodes is not None:
        episode_ids = episode_ids[:limit_episodes]
    if not len(episode_ids):
        raise QueryError(f"--limit {limit_episodes} keeps no episode; nothing written to {out_uri}")
    stats = ReadStats()
    with VersionWriter(out_uri) as writer:
        written: list[WrittenPart] = []
        pending: tuple[pa.Table, pa.Table] | None = None
        for steps, episodes in iter_episodes(dataset, episode_ids, stats):
            first_id = episodes.column(cols.EPISODE_ID)[0].as_py()
            if pending is not None and first_id <= pending[1].column(cols.EPISODE_ID)[-1].as_py():
                # Source parts whose episode ids interleave: a part is sorted, not the
                # dataset, so what waits becomes a part of its own.
                written.append(writer.write_part(len(written), *pending))
                pending = None
            if pending is not None:
                steps = pa.concat_tables([pending[0], steps])
                episodes = pa.concat_tables([pending[1], episodes])
            # Whole parts of `part_steps` (as write_dataset cuts them); the rest waits.
            *full, last = part_slices(steps, episodes, part_steps)
            for part_steps_table, part_episodes in full:
                written.append(writer.write_part(len(written), part_steps_table, part_episodes))
            pending = last
        if pending is not None:
            written.append(writer.write_part(len(written), *pending))
        steps_count = sum(w.part.steps for w in written)
        episodes_count = sum(w.part.episodes for w in written)
        manifest = base_manifest(
            writer.uri,
            written,
            operation="query",
            command=command,
            parent=dataset,
            details={
                "where": where,
                "limit_episodes": limit_episodes,
                "parent_uri": dataset.uri,
                "parent_id": dataset.manifest.dataset_id,
                "episodes": episodes_count,
                "steps": steps_count,
                "groups_merged": [g.name for g in dataset.manifest.groups],
            },
        )
        writer.commit(manifest)
    return manifest, stats
