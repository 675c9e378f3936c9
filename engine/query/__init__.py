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
   with episode columns broadcast to their steps where a condition mixes both; they must be
   row-local (an allow-list, `row_local`), since a part is not the whole dataset;
3. the selected columns are read last, only for the rows that matched.

The modules, in the order a query goes through them: `plan` (parse, split, check),
`row_local` (which step conditions may run part by part), `read` (chosen rows of a part),
`run` (query, count, matching_episodes), `subset` (whole episodes as a new version),
`cluster` (a subset stored in the order of chosen episode columns: `--cluster-by`).
"""

from engine.query.cluster import ORIGINAL_EPISODE_ID
from engine.query.plan import LEVELS, Plan, QueryError, conjuncts, parse_where, plan_query
from engine.query.read import (
    PartReader,
    ReadStats,
    read_part_rows,
    read_rows,
    row_group_selection,
)
from engine.query.row_local import ROW_LOCAL, across_rows, expression_tree, is_row_local
from engine.query.run import QueryResult, count, matching_episodes, query
from engine.query.subset import iter_episodes, write_subset

__all__ = [
    "LEVELS",
    "ORIGINAL_EPISODE_ID",
    "ROW_LOCAL",
    "PartReader",
    "Plan",
    "QueryError",
    "QueryResult",
    "ReadStats",
    "across_rows",
    "conjuncts",
    "count",
    "expression_tree",
    "is_row_local",
    "iter_episodes",
    "matching_episodes",
    "parse_where",
    "plan_query",
    "query",
    "read_part_rows",
    "read_rows",
    "row_group_selection",
    "write_subset",
]
