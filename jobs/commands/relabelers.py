"""`hindsight relabelers`: what can be attached (built-in and third-party relabelers)."""

from __future__ import annotations

from typing import Any

from jobs.command import Command


class Relabelers(Command):
    """List installed relabelers (entry point group `hindsight.relabelers`) with their
    parameters and the columns they read and write."""

    name = "relabelers"

    def run(self) -> list[dict[str, Any]]:
        return describe_relabelers()

    def summary(self, result: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return result

    def report(self, result: list[dict[str, Any]], seconds: float) -> str:
        return format_relabelers(result)


def describe_relabelers() -> list[dict[str, Any]]:
    """Every installed relabeler: name, version, parameters, and (with default parameters)
    the columns it reads and writes."""
    from relabelers import registry
    from relabelers.base import RelabelError, describe_params

    rows = []
    for name, entry_point in sorted(registry.available().items()):
        row: dict[str, Any] = {"name": name, "entry_point": entry_point.value}
        try:
            relabeler_class = registry.get(name)
        except Exception as error:  # a broken plugin must not hide the others
            row["error"] = f"cannot load: {error}"
            rows.append(row)
            continue
        row["version"] = relabeler_class.version
        row["params"] = describe_params(relabeler_class.Params)
        try:
            relabeler = relabeler_class({})
            reads, writes = relabeler.reads(), relabeler.writes()
            row["reads"] = {"steps": list(reads.steps), "episodes": list(reads.episodes)}
            optional = [*reads.steps_if_present, *reads.episodes_if_present]
            if optional:
                row["reads"]["when present"] = optional
            if reads.steps_schema:
                row["reads"]["type only"] = list(reads.steps_schema)
            row["writes"] = {"steps": list(writes.steps), "episodes": list(writes.episodes)}
        except (RelabelError, ValueError):
            row["reads"] = row["writes"] = "depends on required parameters"
        rows.append(row)
    return rows


def format_relabelers(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        lines.append(f"{row['name']} {row.get('version', '?')}  ({row['entry_point']})")
        if "error" in row:
            lines.append(f"  {row['error']}")
            continue
        lines.append(f"  params: {row['params']}")
        for key in ("reads", "writes"):
            value = row[key]
            if isinstance(value, dict):
                value = "; ".join(f"{level}: {', '.join(v)}" for level, v in value.items() if v)
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)
