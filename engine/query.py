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

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.dataset import Dataset, DatasetError, open_dataset, write_dataset
from schemas import steps as cols
from schemas.manifest import Manifest

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


@dataclass
class ReadStats:
    """What a query read: Parquet column chunks (compressed bytes, as stored) and footers."""

    files: int = 0
    row_groups: int = 0
    row_groups_skipped: int = 0
    bytes: int = 0
    parts_skipped: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def read_rows(
    uri: str, columns: Sequence[str], rows: np.ndarray | None, stats: ReadStats
) -> pa.Table:
    """`columns` of one Parquet file at the sorted row positions `rows` (None: all rows).

    Only the row groups that hold a wanted row are read; the rest are never fetched.
    """
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=storage.is_s3(uri))
        metadata = parquet.metadata
        sizes = np.array(
            [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)],
            dtype=np.int64,
        )
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        if rows is None:
            groups = np.arange(len(sizes))
        else:
            if len(rows) and rows[-1] >= offsets[-1]:
                raise DatasetError(
                    f"{uri}: has {offsets[-1]} rows, the episodes table says at least "
                    f"{rows[-1] + 1}; the column groups of this version are not aligned"
                )
            group_of_row = np.searchsorted(offsets, rows, side="right") - 1
            groups = np.unique(group_of_row)
        stats.files += 1
        stats.row_groups += len(groups)
        stats.row_groups_skipped += len(sizes) - len(groups)
        stats.bytes += metadata.serialized_size + _chunk_bytes(metadata, groups, columns)
        if len(groups) == 0:
            return parquet.schema_arrow.empty_table().select(list(columns))
        table = parquet.read_row_groups(groups.tolist(), columns=list(columns))
    if rows is None:
        return table
    # Position of each wanted row inside the concatenation of the row groups read.
    group_start_in_table = np.concatenate([[0], np.cumsum(sizes[groups])[:-1]])
    positions = (
        rows - offsets[group_of_row] + group_start_in_table[np.searchsorted(groups, group_of_row)]
    )
    return table.take(pa.array(positions))


def _chunk_bytes(metadata: pq.FileMetaData, groups: np.ndarray, columns: Sequence[str]) -> int:
    wanted = set(columns)
    total = 0
    for index in groups:
        row_group = metadata.row_group(int(index))
        for j in range(row_group.num_columns):
            chunk = row_group.column(j)
            if chunk.path_in_schema.split(".")[0] in wanted:
                total += chunk.total_compressed_size
    return total


class PartReader:
    """Reads chosen columns of one part at one level, from whichever groups hold them."""

    def __init__(self, dataset: Dataset, level: str, stats: ReadStats):
        self.dataset = dataset
        self.level = level
        self.stats = stats
        self.group_of = {
            f.name: group
            for group in dataset.manifest.groups
            for f in getattr(group, f"{level}_columns")
        }

    def read(self, index: int, columns: Sequence[str], rows: np.ndarray | None = None) -> pa.Table:
        by_group: dict[str, list[str]] = {}
        for column in dict.fromkeys(columns):
            by_group.setdefault(self.group_of[column].name, []).append(column)
        arrays: dict[str, pa.ChunkedArray] = {}
        for group_columns in by_group.values():
            group = self.group_of[group_columns[0]]
            data_file = getattr(group, f"{self.level}_files")[index]
            table = read_rows(
                storage.join(group.root, data_file.path), group_columns, rows, self.stats
            )
            arrays.update({name: table.column(name) for name in group_columns})
        return pa.table({name: arrays[name] for name in dict.fromkeys(columns)})


def _episode_table(
    dataset: Dataset, columns: Sequence[str], stats: ReadStats, parts: Sequence[int]
) -> pl.DataFrame:
    """Episodes of `parts` with `columns`, their part and first step row within the part."""
    reader = PartReader(dataset, "episodes", stats)
    wanted = list(dict.fromkeys([cols.EPISODE_ID, cols.LENGTH, *columns]))
    frames = []
    for index in parts:
        frame = pl.from_arrow(reader.read(index, wanted)).sort(cols.EPISODE_ID)
        lengths = frame[cols.LENGTH].to_numpy()
        expected = dataset.manifest.parts[index].steps
        if int(lengths.sum()) != expected:
            raise DatasetError(
                f"{dataset.uri}: part {index} holds {expected} steps but its episodes' lengths "
                f"add up to {int(lengths.sum())}; validate the dataset"
            )
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        frames.append(
            frame.with_columns(
                pl.lit(index, dtype=pl.Int64).alias(_PART), pl.Series(_START, starts)
            )
        )
    return pl.concat(frames) if frames else pl.DataFrame()


def _episode_rows(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the given episodes (sorted ranges) and, per row, which episode it is."""
    lengths = lengths.astype(np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first_row_of_owner = np.repeat(starts.astype(np.int64) - np.cumsum(lengths) + lengths, lengths)
    rows = first_row_of_owner + np.arange(int(lengths.sum()), dtype=np.int64)
    return rows, owner


# ---------------------------------------------------------------- running a query


@dataclass
class QueryResult:
    frame: pl.DataFrame
    plan: Plan
    stats: ReadStats


def _open(dataset: Dataset | str) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else open_dataset(dataset)


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
        episodes = episodes.filter(plan.episode_condition)
    return episodes


def _matching_steps_of_part(
    dataset: Dataset,
    plan: Plan,
    index: int,
    candidates: pl.DataFrame,
    reader: PartReader,
) -> tuple[np.ndarray, np.ndarray, pa.Table | None]:
    """Rows of part `index` that match, which candidate episode owns each, and the step
    columns already read for the condition (at the matching rows)."""
    rows, owner = _episode_rows(candidates[_START].to_numpy(), candidates[cols.LENGTH].to_numpy())
    if plan.row_condition is None:
        return rows, owner, None
    whole_part = plan.episode_condition is None
    read_at = None if whole_part else rows
    condition_steps = (
        reader.read(index, plan.row_step_columns, read_at) if plan.row_step_columns else None
    )
    frame = pl.from_arrow(condition_steps) if condition_steps is not None else pl.DataFrame()
    if plan.row_episode_columns:
        broadcast = candidates.select(plan.row_episode_columns)[owner]
        frame = pl.concat([frame, broadcast], how="horizontal") if frame.width else broadcast
    if not frame.width:
        frame = pl.DataFrame({"__row": rows})
    mask = frame.select(plan.row_condition.fill_null(False)).to_series()
    if mask.len() == 1 and len(rows) != 1:
        mask = pl.Series([bool(mask[0])] * len(rows))
    keep = mask.to_numpy()
    return (
        rows[keep],
        owner[keep],
        condition_steps.filter(pa.array(keep)) if condition_steps is not None else None,
    )


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
    for index in range(dataset.num_parts):
        if limit is not None and found >= limit:
            stats.parts_skipped += 1
            continue
        part_candidates = candidates.filter(pl.col(_PART) == index) if candidates.height else None
        if part_candidates is None or part_candidates.height == 0:
            stats.parts_skipped += 1
            continue
        rows, owner, condition_steps = _matching_steps_of_part(
            dataset, plan, index, part_candidates, reader
        )
        if limit is not None:
            rows, owner = rows[: limit - found], owner[: limit - found]
            if condition_steps is not None:
                condition_steps = condition_steps.slice(0, len(rows))
        if len(rows) == 0:
            continue
        already = condition_steps.column_names if condition_steps is not None else []
        to_read = [c for c in step_select if c not in already]
        read_at = None if len(rows) == dataset.manifest.parts[index].steps else rows
        arrays = {}
        if to_read:
            table = reader.read(index, to_read, read_at)
            arrays.update({c: table.column(c) for c in to_read})
        if condition_steps is not None:
            arrays.update({c: condition_steps.column(c) for c in already if c in step_select})
        piece = pl.from_arrow(pa.table(arrays)) if arrays else pl.DataFrame()
        if plan.select_episode_columns:
            broadcast = part_candidates.select(plan.select_episode_columns)[owner]
            piece = pl.concat([piece, broadcast], how="horizontal") if piece.width else broadcast
        pieces.append(piece.select(plan.select))
        found += len(rows)
    frame = pl.concat(pieces) if pieces else _empty(dataset, plan)
    return QueryResult(frame, plan, stats)


def _empty(dataset: Dataset, plan: Plan) -> pl.DataFrame:
    """A zero-row frame with the right schema (read from the first part's footers)."""
    schema: dict[str, pa.DataType] = {}
    for level in LEVELS:
        for group in dataset.manifest.groups:
            files = getattr(group, f"{level}_files")
            if not files:
                continue
            fs, path = storage.filesystem(storage.join(group.root, files[0].path))
            for arrow_field in pq.read_schema(path, filesystem=fs):
                schema.setdefault(arrow_field.name, arrow_field.type)
    return pl.from_arrow(pa.schema([(c, schema[c]) for c in plan.select]).empty_table())


def count(dataset: Dataset | str, where: str | None = None, *, level: str = "steps") -> int:
    """How many rows match, reading only the columns the condition uses."""
    dataset = _open(dataset)
    plan = plan_query(dataset, where, level, [cols.EPISODE_ID])
    stats = ReadStats()
    if level == "episodes" or plan.row_condition is None:
        candidates = _candidate_episodes(dataset, plan, plan.row_episode_columns, stats)
        if level == "episodes":
            return candidates.height
        return int(candidates[cols.LENGTH].sum()) if candidates.height else 0
    return matching_episodes(dataset, where, with_counts=True)[1]


def matching_episodes(
    dataset: Dataset | str, where: str | None, *, with_counts: bool = False
) -> pl.DataFrame | tuple[pl.DataFrame, int]:
    """Episodes (episode_id, part) with at least one step matching `where`, in order."""
    dataset = _open(dataset)
    plan = plan_query(dataset, where, "steps", [cols.EPISODE_ID])
    stats = ReadStats()
    candidates = _candidate_episodes(dataset, plan, plan.row_episode_columns, stats)
    if plan.row_condition is None or not candidates.height:
        steps = int(candidates[cols.LENGTH].sum()) if candidates.height else 0
        selected = candidates.select(cols.EPISODE_ID, _PART) if candidates.height else candidates
        return (selected, steps) if with_counts else selected
    reader = PartReader(dataset, "steps", stats)
    kept = []
    steps = 0
    for index in range(dataset.num_parts):
        part_candidates = candidates.filter(pl.col(_PART) == index)
        if not part_candidates.height:
            continue
        rows, owner, _ = _matching_steps_of_part(dataset, plan, index, part_candidates, reader)
        steps += len(rows)
        kept.append(part_candidates[np.unique(owner)].select(cols.EPISODE_ID, _PART))
    selected = pl.concat(kept) if kept else pl.DataFrame()
    return (selected, steps) if with_counts else selected


# ---------------------------------------------------------------- writing a subset


def read_episodes(
    dataset: Dataset | str, episode_ids: Sequence[int] | np.ndarray, stats: ReadStats | None = None
) -> tuple[pa.Table, pa.Table]:
    """All step and episode columns of the given whole episodes, sorted by episode_id.

    Parts whose [min_episode_id, max_episode_id] in the manifest holds none of the ids are
    not opened.
    """
    dataset = _open(dataset)
    stats = stats if stats is not None else ReadStats()
    wanted = np.unique(np.asarray(episode_ids, dtype=np.int64))
    step_reader = PartReader(dataset, "steps", stats)
    episode_reader = PartReader(dataset, "episodes", stats)
    step_tables, episode_tables = [], []
    for index, part in enumerate(dataset.manifest.parts):
        low, high = np.searchsorted(wanted, [part.min_episode_id, part.max_episode_id + 1])
        if low == high:
            stats.parts_skipped += 1
            continue
        episodes = _episode_table(dataset, [], stats, [index])
        chosen = episodes.filter(pl.col(cols.EPISODE_ID).is_in(pl.Series(wanted[low:high])))
        if not chosen.height:
            continue
        rows, _ = _episode_rows(chosen[_START].to_numpy(), chosen[cols.LENGTH].to_numpy())
        whole = len(rows) == part.steps
        step_tables.append(
            step_reader.read(index, dataset.columns("steps"), None if whole else rows)
        )
        all_episodes = episode_reader.read(index, dataset.columns("episodes"))
        order = pa.compute.sort_indices(all_episodes.column(cols.EPISODE_ID))
        all_episodes = all_episodes.take(order)
        keep = pa.compute.is_in(
            all_episodes.column(cols.EPISODE_ID), value_set=pa.array(chosen[cols.EPISODE_ID])
        )
        episode_tables.append(all_episodes.filter(keep))
    if not step_tables:
        raise QueryError(f"{dataset.uri}: none of the requested episodes are in the dataset")
    return pa.concat_tables(step_tables), pa.concat_tables(episode_tables)


def write_subset(
    dataset: Dataset | str,
    where: str | None,
    out_uri: str,
    *,
    command: str,
    limit_episodes: int | None = None,
) -> tuple[Manifest, ReadStats]:
    """A new self-contained version (one `base` group, every column) of the whole episodes
    with at least one step matching `where`; its history records the query and the parent.
    """
    dataset = _open(dataset)
    selected = matching_episodes(dataset, where)
    if not selected.height:
        raise QueryError(
            f"{dataset.uri}: no episode matches --where {where!r}; nothing written to {out_uri}"
        )
    episode_ids = selected[cols.EPISODE_ID].to_numpy()
    if limit_episodes is not None:
        episode_ids = episode_ids[:limit_episodes]
    stats = ReadStats()
    steps, episodes = read_episodes(dataset, episode_ids, stats)
    manifest = write_dataset(
        out_uri,
        steps,
        episodes,
        operation="query",
        command=command,
        parent=dataset.manifest,
        parent_uri=dataset.uri,
        details={
            "where": where,
            "limit_episodes": limit_episodes,
            "parent_uri": dataset.uri,
            "parent_id": dataset.manifest.dataset_id,
            "episodes": episodes.num_rows,
            "steps": steps.num_rows,
            "groups_merged": [g.name for g in dataset.manifest.groups],
        },
    )
    return manifest, stats
