"""Relabelers by name, discovered through the `hindsight.relabelers` entry point group.

Built-ins are registered exactly like third-party plugins (see pyproject.toml).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from relabelers.base import Relabeler, RelabelError
from schemas.manifest import public_text

ENTRY_POINT_GROUP = "hindsight.relabelers"


def available() -> dict[str, Any]:
    """Installed relabelers: name -> entry point (not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get(name: str) -> type[Relabeler]:
    points = available()
    if name not in points:
        raise RelabelError(
            f"no relabeler named {name!r}; installed: {', '.join(sorted(points)) or 'none'} "
            "(third-party relabelers register under the entry point group "
            f"{ENTRY_POINT_GROUP!r})"
        )
    relabeler_class = points[name].load()
    if not (isinstance(relabeler_class, type) and issubclass(relabeler_class, Relabeler)):
        raise RelabelError(f"entry point {name!r} does not point to a Relabeler subclass")
    return relabeler_class


def create(name: str, params: dict[str, Any] | None = None, seed: int = 0) -> Relabeler:
    return get(name)(params or {}, seed=seed)


def parse_with(text: str) -> tuple[str, dict[str, str]]:
    """`returns:gamma=0.99,reference_random=-1200` -> ("returns", {"gamma": "0.99", ...}).

    Values stay strings here; each relabeler's pydantic Params converts and validates them.
    A value holding commas (a list) is written with `;` between its items.
    """
    shown = public_text(text)  # what an error may quote of it
    name, _, rest = text.partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (piece.strip() for piece in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise RelabelError(
                f"--with {shown!r}: parameter {public_text(item)!r} is not of the form key=value"
            )
        if key.strip() in params:
            raise RelabelError(
                f"--with {shown!r}: parameter {key.strip()!r} is given twice; give it once"
            )
        params[key.strip()] = value.strip()
    return name.strip(), params
