"""Derived step columns: columns a version does not store, which hindsight's readers
compute from stored columns of whole episodes when they are asked for.

Today there is one kind: a `goals` group written with `store=steps` stores
`hindsight_goal_step` only, and `hindsight_goal`, `hindsight_reward` and
`hindsight_reached` are derived from those goal steps and the achieved goals
(schemas/goals.py, the same code that `store=vectors` writes them with). What a group
derives is known from its manifest entry alone: the relabeler's name and parameters
(`goals`, `store: steps`, `achieved`, `threshold`); their types follow from the
dataset's step schema (`k`: the stored goal-step lists' size). A manifest entry they cannot
be derived from still lists them; using one raises why, naming the version and group.

Every reader of step columns asks here: `Dataset.columns` / `arrow_schema` / `group_of`
list them, `Dataset.read_part` derives them (shards, exports, materialize, relabel jobs),
the query reader derives them per part (`hindsight query`, subsets), and `engine.scan`
adds them to its LazyFrame. Derivation reads whole parts: parts hold whole episodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from schemas.goals import DERIVED_COLUMNS, GOAL_COLUMNS, GoalRecipe, GoalsError
from schemas.manifest import ColumnGroup

if TYPE_CHECKING:
    import polars as pl


@dataclass(frozen=True)
class DerivedColumn:
    """A step column derived at read: the group it belongs to and how to derive it."""

    name: str
    group: ColumnGroup
    recipe: GoalRecipe


def recipe_of(group: ColumnGroup, uri: str = "") -> GoalRecipe | None:
    """How `group` (of the version at `uri`) derives columns at read; None for a group that
    stores all of its own. A manifest it cannot derive from gives a recipe that raises,
    naming the version and group, only when a derived column is used."""
    if group.relabeler is None:
        return None
    label = f"{uri + ': ' if uri else ''}goals group {group.name!r}"
    info = group.relabeler
    return GoalRecipe.of(info.name, info.params, info.version, label)


def derived_columns(groups: Sequence[ColumnGroup], uri: str = "") -> dict[str, DerivedColumn]:
    """Name -> derived step column of a version (at `uri`) with these groups, in group order."""
    found = {}
    for group in groups:
        recipe = recipe_of(group, uri)
        if recipe is not None:
            found |= {name: DerivedColumn(name, group, recipe) for name in DERIVED_COLUMNS}
    return found


def problem(column: DerivedColumn, stored: pa.Schema) -> str | None:
    """Why `column` cannot be derived in a version whose stored step columns have the
    schema `stored` (without the version and group); None when it can."""
    try:
        column.recipe.types(stored)
    except GoalsError as error:
        return str(error).removeprefix(f"{column.recipe.label}: ")
    return None


def group_fields(group: ColumnGroup, fields: list[pa.Field], stored: pa.Schema) -> list[pa.Field]:
    """`group`'s step fields `fields` with its derived ones, in the order the group would
    store them all (a store=steps goals group looks like a store=vectors one), for a
    version whose stored step columns have the schema `stored`."""
    recipe = recipe_of(group)
    if recipe is None:
        return fields
    try:
        types = recipe.types(stored)
    except GoalsError:  # not derivable: listed as null, reading one raises why
        types = {name: pa.null() for name in DERIVED_COLUMNS}
    every = {f.name: f for f in fields} | {name: pa.field(name, types[name]) for name in types}
    return [every[name] for name in GOAL_COLUMNS if name in every]


def group_columns(group: ColumnGroup, names: list[str]) -> list[str]:
    """`group`'s step columns `names` with its derived ones, in that order (no types)."""
    if recipe_of(group) is None:
        return names
    every = set(names) | set(DERIVED_COLUMNS)
    return [name for name in GOAL_COLUMNS if name in every]


def sources(derived: Mapping[str, DerivedColumn], names: Sequence[str], stored: Sequence[str]):
    """The stored step columns that deriving `names` reads (of a version that stores
    `stored`)."""
    wanted: list[str] = []
    for name in names:
        wanted += derived[name].recipe.sources(stored)
    return list(dict.fromkeys(wanted))


def derive(
    derived: Mapping[str, DerivedColumn], steps: pa.Table, names: Sequence[str], where: str
) -> pa.Table:
    """The derived columns `names` for `steps` (whole episodes holding their sources)."""
    by_recipe: dict[GoalRecipe, list[str]] = {}
    for name in names:
        by_recipe.setdefault(derived[name].recipe, []).append(name)
    columns: dict[str, pa.ChunkedArray] = {}
    for recipe, recipe_names in by_recipe.items():
        table = recipe.derive(steps, recipe_names, where)
        columns |= {name: table.column(name) for name in recipe_names}
    return pa.table({name: columns[name] for name in names})


def with_derived(
    frame: pl.LazyFrame,
    derived: Mapping[str, DerivedColumn],
    stored: pa.Schema,
    where: str = "engine.scan",
) -> pl.LazyFrame:
    """A LazyFrame over whole episodes (a version's step columns, rows in order) with the
    derived columns added. Each recipe derives once over the whole frame, all of its
    columns together (a struct, then its fields), when any of them is selected: a
    projection that leaves them all out never derives."""
    import polars as pl

    by_recipe: dict[GoalRecipe, list[str]] = {}
    for name, column in derived.items():
        by_recipe.setdefault(column.recipe, []).append(name)
    for index, (recipe, names) in enumerate(by_recipe.items()):
        problem: GoalsError | None = None
        try:
            types = recipe.types(stored)
            sources = recipe.sources(stored.names)
        except GoalsError as error:  # not derivable: null columns whose computation raises why
            problem, types, sources = error, {name: pa.null() for name in names}, stored.names[:1]
        empty = pa.schema([(name, types[name]) for name in names]).empty_table()
        dtype = pl.Struct(pl.from_arrow(empty).schema)

        def compute(
            struct: pl.Series,
            recipe: GoalRecipe = recipe,
            names: list[str] = names,
            problem: GoalsError | None = problem,
        ) -> pl.Series:
            if problem is not None:
                raise problem
            steps = struct.struct.unnest().to_arrow()
            made = pl.from_arrow(recipe.derive(steps, names, where))
            return made.to_struct(struct.name)

        # One derivation per recipe: a column per derived name, each its own UDF, would
        # derive the goals once for every column selected (3x the time and memory).
        hidden = f"__hindsight_derived_{index}"
        frame = (
            frame.with_columns(
                pl.struct(sources).map_batches(compute, return_dtype=dtype).alias(hidden)
            )
            .with_columns(pl.col(hidden).struct.field(*names))
            .drop(hidden)
        )
    return frame
