"""Planning a query: the `--where` text parsed with Polars SQL, split into its AND-ed parts,
each part placed on the episodes table or on the step rows, every column checked, before
any data is read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from engine.dataset import LEVELS, Dataset
from engine.query.row_local import across_rows
from schemas import steps as cols

_SQL_PREFIX = "SELECT * FROM t WHERE "


class QueryError(ValueError):
    """A query the user must fix: a syntax error, an unknown column, a bad option."""


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


def _not_row_local_error(where: str, what: str) -> QueryError:
    return QueryError(
        f"--where {where!r}: {what} over step rows is not supported: steps are filtered "
        "part by part, and a step condition runs that way only if every operation in it is "
        "known to be row-local (docs/query.md lists them), so it is never computed per part "
        "by mistake. Aggregates over episode columns work (they run on the whole episodes "
        "table), and so do windows within an episode (`... OVER (PARTITION BY "
        "episode_id)`); otherwise compute the value with Polars on the whole dataset first, "
        "e.g. engine.scan(uri).select(pl.col('reward').mean()).collect(), or filter "
        "engine.scan(uri) directly."
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
    A step condition must be row-local (`engine.query.row_local`); otherwise QueryError.
    """
    if level not in LEVELS:
        raise QueryError(f"level must be one of {LEVELS}, not {level!r}")
    step_columns = set(dataset.columns("steps"))
    episode_columns = set(dataset.columns("episodes"))
    level_columns = step_columns if level == "steps" else episode_columns
    # Camera frames are read only when selected by name: the default is every other column.
    selected = list(dict.fromkeys(select)) if select else dataset.columns(level, frames=False)

    if level == "episodes":
        unknown = [c for c in selected if c not in episode_columns]
        if unknown:
            hint = [c for c in unknown if c in step_columns]
            error = _unknown_columns_error(unknown, dataset, "--select of an episodes query")
            if hint:
                error = QueryError(
                    f"{error}\n  {hint} are step columns: query steps (--level steps)"
                )
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
                "Query steps (--level steps) to get the matching steps."
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
        if what := across_rows(part):
            raise _not_row_local_error(where, what)
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
