"""Which step conditions may run part by part: an allow-list of what is known to be row-local.

Steps are filtered one part at a time, so a condition over step rows must give each row the
same answer whatever other rows are read with it. An aggregate (`reward > avg(reward)`), a
shift, a rank or a window over the whole dataset would be computed per part: silently wrong.
So a step condition runs only if every operation in it is on `ROW_LOCAL` (comparisons,
arithmetic, boolean logic, `IN`, `IS NULL`, casts, and functions that act on each value
alone), with two scopes where anything goes because what they compute stays inside data a
part holds whole:

- a window partitioned by `episode_id` (alone or with more columns): an episode is never
  split across parts and is read whole (`reward = max(reward) OVER (PARTITION BY
  episode_id)`);
- the expression a list function evaluates on each list value (`array_unique(x)`).

Everything else is refused, naming it, including what a later Polars adds: a function is
row-local only once someone has checked it and listed it here.

Polars has no stable API that lists what each node of an expression computes (`Expr.meta`
gives a node's inputs and the root columns, not its operation), so `expression_tree` reads
the JSON of `Expr.meta.serialize`, which Polars does not promise to keep. It is the only
function that reads that format; tests pin what it returns for known expressions, and a
node it does not recognize gets a name on no list, so a change of format refuses conditions
(loudly) instead of letting one through.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import polars as pl

from schemas import steps as cols

# Polars' names of operations that give each row a value from that row alone. An entry
# also allows its variants (`Function.Pow` allows `Function.Pow.Sqrt`); a namespace is
# listed whole only where every member acts per value (trigonometry, SQL's binary operators).
ROW_LOCAL = frozenset(
    {
        # values and structure
        "Column", "Literal.Dyn", "Literal.Scalar", "Alias", "KeepName", "Cast", "Ternary",
        "Eval.List", "Eval.Array",
        # comparisons, arithmetic, boolean logic
        *(
            f"BinaryExpr.{op}"
            for op in (
                "Eq", "EqValidity", "NotEq", "NotEqValidity", "Lt", "LtEq", "Gt", "GtEq",
                "Plus", "Minus", "Multiply", "RustDivide", "TrueDivide", "FloorDivide",
                "Modulus", "And", "Or", "Xor", "LogicalAnd", "LogicalOr",
            )
        ),
        # numbers
        *(
            f"Function.{name}"
            for name in (
                "Abs", "Negate", "Sign", "Ceil", "Floor", "Round", "Truncate", "Clip", "Exp",
                "Log", "Log1p", "Pow", "Atan2", "Trigonometry", "Bitwise.CountOnes",
                "Bitwise.CountZeros", "Sql.Binary", "Sql.Round", "Sql.ToFloat",
            )
        ),
        # nulls, several columns of one row, membership
        *(
            f"Function.{name}"
            for name in (
                "FillNull", "Coalesce", "Replace", "MaxHorizontal", "MinHorizontal",
                "SumHorizontal", "MeanHorizontal", "Boolean.AllHorizontal",
                "Boolean.AnyHorizontal", "Boolean.Not", "Boolean.IsNull", "Boolean.IsNotNull",
                "Boolean.IsNan", "Boolean.IsNotNan", "Boolean.IsFinite", "Boolean.IsInfinite",
                "Boolean.IsBetween", "Boolean.IsIn", "Sql.IsIn",
            )
        ),
        # strings (not Strptime: without a format it infers one from the first value;
        # not ConcatVertical: it joins the values of all rows)
        *(
            f"Function.StringExpr.{name}"
            for name in (
                "LenChars", "LenBytes", "Lowercase", "Uppercase", "Titlecase", "StripChars",
                "StripCharsStart", "StripCharsEnd", "StripPrefix", "StripSuffix", "Reverse",
                "Normalize", "ConcatHorizontal", "StartsWith", "EndsWith", "Find", "Contains",
                "CountMatches", "Extract", "Replace", "Split", "Slice", "Head", "Tail",
                "PadStart", "PadEnd", "ZFill", "ToInteger",
            )
        ),
        # lists and arrays, each value on its own
        *(
            f"Function.{kind}.{name}"
            for kind in ("ListExpr", "ArrayExpr")
            for name in (
                "Length", "Get", "Contains", "Sum", "Mean", "Min", "Max", "Join", "ToList",
            )
        ),
        "Function.StructExpr.FieldByName",
        # dates and times
        *(
            f"Function.TemporalExpr.{name}"
            for name in (
                "Millennium", "Century", "Year", "IsoYear", "IsLeapYear", "Quarter", "Month",
                "Week", "WeekDay", "Day", "OrdinalDay", "Hour", "Minute", "Second",
                "Millisecond", "Microsecond", "Nanosecond", "Time", "Date", "TimeStamp",
                "ToString", "BaseUtcOffset", "TotalDays", "TotalHours", "TotalMinutes",
                "TotalSeconds", "TotalMilliseconds", "TotalMicroseconds", "TotalNanoseconds",
            )
        ),
    }
)  # fmt: skip

# Only the wording of a refusal: what is not on ROW_LOCAL is refused either way.
_FUNCTIONS_OF_OTHER_ROWS = (
    "Cum", "Shift", "Rank", "Diff", "PctChange", "Rolling", "Unique", "Mode", "Reverse",
    "FillNullWithStrategy", "Interpolate", "ArgSort", "ArgMin", "ArgMax", "Implode",
    "Quantile", "Correlation", "Range", "NullCount", "PeakMin", "PeakMax", "RLE",
    "Boolean.Any", "Boolean.All", "Boolean.IsUnique", "Boolean.IsDuplicated",
    "Boolean.IsFirstDistinct", "Boolean.IsLastDistinct", "StringExpr.ConcatVertical",
    "Explode", "Gather", "Slice", "Filter", "Sort", "SortBy",
)  # fmt: skip
# `x IN (...)`: the set is a Series literal, compared as a set, not row by row.
_SET_MEMBERSHIP = ("Function.Sql.IsIn", "Function.Boolean.IsIn")
_EPISODE_WINDOW = "Over.GroupsToRows"


@dataclass(frozen=True)
class Node:
    """One operation of a condition, named as Polars names it (`BinaryExpr.Gt`,
    `Function.StringExpr.Lowercase`, `Agg.Mean`, `Over.GroupsToRows`, `Column`)."""

    name: str
    inputs: tuple[Node, ...] = ()  # evaluated on the same rows as this node
    scoped: tuple[Node, ...] = ()  # a window's function and order, a list function's body
    partition_by: tuple[str | None, ...] = ()  # a window's keys: column names, None if not one
    raw: object = field(default=None, compare=False, repr=False)

    def walk(self) -> Iterator[Node]:
        """This node and every node below it."""
        yield self
        for child in (*self.inputs, *self.scoped):
            yield from child.walk()

    def describe(self) -> str:
        """The operation (without Polars' kind of node, `Function.` or `Agg.`) and the
        sub-expression as Polars prints it: `Rank: col("reward").rank()`."""
        name = self.name.removeprefix("Function.").removeprefix("Agg.")
        text = _polars_text(self.raw)
        return f"{name}: {text}" if text else name


def across_rows(expression: pl.Expr) -> str | None:
    """What in a step condition is not known to be row-local, in words and naming the
    operation (`a function of other rows (Rank: col("reward").rank())`), or None when every
    operation is on ROW_LOCAL or inside a window within an episode."""
    return _first_refused(expression_tree(expression), in_episode_window=False)


def is_row_local(name: str) -> bool:
    """Whether an operation (Polars' name, as in `Node.name`) is on ROW_LOCAL."""
    parts = name.split(".")
    return any(".".join(parts[:n]) in ROW_LOCAL for n in range(1, len(parts) + 1))


def _first_refused(node: Node, in_episode_window: bool) -> str | None:
    if node.name.startswith("Over."):
        if node.name != _EPISODE_WINDOW or cols.EPISODE_ID not in node.partition_by:
            return f"a window over more than one episode ({_polars_text(node.raw) or node.name})"
        # The keys are computed on the part's rows; what is inside, per episode.
        found = (_first_refused(key, in_episode_window) for key in node.inputs)
        inside = (_first_refused(child, True) for child in node.scoped)
        return next((f for f in (*found, *inside) if f), None)
    if not in_episode_window and not is_row_local(node.name):
        return _refusal(node)
    for index, child in enumerate(node.inputs):
        if index and node.name.startswith(_SET_MEMBERSHIP) and child.name == "Literal.Series":
            continue
        if found := _first_refused(child, in_episode_window):
            return found
    # A list function's body sees one list value at a time: nothing of other rows.
    return None


def _refusal(node: Node) -> str:
    short = node.name.removeprefix("Function.")
    if node.name.startswith("Agg.") or node.name in ("Len", "SubPlan"):
        return f"an aggregate ({node.describe()})"
    if short.startswith(_FUNCTIONS_OF_OTHER_ROWS):
        return f"a function of other rows ({node.describe()})"
    return f"an operation not known to be row-local ({node.describe()})"


# ---------------------------------------------------------------- Polars' serialized form
# The only code that reads Polars' serialized expressions (see the module docstring).


def expression_tree(expression: pl.Expr) -> Node:
    """The operations of an expression as a tree of `Node`s."""
    return _node(json.loads(expression.meta.serialize(format="json")))


def _node(raw: object) -> Node:
    if isinstance(raw, str):  # operations without arguments: "Len", "Element"
        return Node(raw, raw=raw)
    if not (isinstance(raw, dict) and len(raw) == 1):
        return Node(f"unrecognized {json.dumps(raw)[:60]}", raw=raw)
    ((kind, body),) = raw.items()
    try:
        return _parse(kind, body, raw)
    except (KeyError, TypeError, ValueError, IndexError):
        return Node(f"unrecognized {kind}", raw=raw)


def _parse(kind: str, body: object, raw: dict) -> Node:
    if kind == "Column":
        return Node("Column", raw=raw)
    if kind == "Literal":
        kind_of_value = body if isinstance(body, str) else next(iter(body))  # Dyn, Scalar, Series
        return Node(f"Literal.{kind_of_value}", raw=raw)
    if kind == "BinaryExpr":
        inputs = (_node(body["left"]), _node(body["right"]))
        return Node(f"BinaryExpr.{body['op']}", inputs, raw=raw)
    if kind == "Function":
        inputs = tuple(_node(item) for item in body["input"])
        return Node(f"Function.{_variant(body['function'])}", inputs, raw=raw)
    if kind == "Cast":
        return Node("Cast", (_node(body["expr"]),), raw=raw)
    if kind == "Ternary":
        branches = (body["predicate"], body["truthy"], body["falsy"])
        return Node("Ternary", tuple(_node(b) for b in branches), raw=raw)
    if kind in ("Alias", "KeepName"):
        return Node(kind, (_node(body[0] if kind == "Alias" else body),), raw=raw)
    if kind == "Agg":
        ((name, inner),) = body.items()
        argument = inner.get("input", inner) if isinstance(inner, dict) else inner
        return Node(f"Agg.{name}", (_node(argument),), raw=raw)
    if kind == "Over":
        keys = tuple(_node(key) for key in body["partition_by"])
        scoped = [_node(body["function"])]
        if body.get("order_by"):
            scoped.append(_node(body["order_by"][0]))
        names = tuple(raw_key.get("Column") for raw_key in body["partition_by"])
        mapping = _variant(body["mapping"])
        return Node(f"Over.{mapping}", keys, tuple(scoped), names, raw=raw)
    if kind == "Eval":
        scoped = (_node(body["evaluation"]),)
        return Node(f"Eval.{_variant(body['variant'])}", (_node(body["expr"]),), scoped, raw=raw)
    return Node(kind, raw=raw)  # on no list: refused, named


def _variant(value: object) -> str:
    """A Rust enum variant as Polars serializes it: `"Abs"`, `{"StringExpr": "Lowercase"}`,
    `{"Rank": {"options": ...}}` -> "Abs", "StringExpr.Lowercase", "Rank"."""
    parts = []
    while True:
        if isinstance(value, str):
            if value[:1].isupper():
                parts.append(value)
            break
        if not (isinstance(value, dict) and len(value) == 1):
            break
        ((key, value),) = value.items()
        if not key[:1].isupper():
            break
        parts.append(key)
    return ".".join(parts) or "?"


def _polars_text(raw: object) -> str:
    """A sub-expression as Polars prints it (`col("reward").rank()`), or "" if it cannot."""
    if not isinstance(raw, dict):
        return ""
    try:
        return str(pl.Expr.deserialize(io.StringIO(json.dumps(raw)), format="json"))
    except Exception:  # only a message: Polars' own rendering, when it manages
        return ""
