"""Minari's default storage format, read with h5py alone (minari itself is not needed):
`data/main_data.hdf5` holds one group per episode (`episode_<id>`) with its arrays, nested
groups for dict observations and infos. Reading goes through h5py's low-level API: its
high-level objects cost ~0.1 ms each, as much as the data of a short episode."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def hdf5_episodes(
    data_file: str, episode_ids: list[int] | None, budget: float
) -> Iterator[tuple[dict[str, Any], bool]]:
    import h5py

    try:
        handle = h5py.File(data_file, "r")
    except OSError as error:
        raise ValueError(
            f"{data_file}: cannot read it as HDF5 (truncated or corrupt file?): {error}"
        ) from error
    with handle:
        names = (
            episode_names(handle) if episode_ids is None else [f"episode_{e}" for e in episode_ids]
        )
        for name in names:
            # h5py's low-level API: its objects cost ~0.1 ms each, as much as the data of
            # a short episode, so a small dataset is read about 3x faster.
            group = h5py.h5o.open(handle.id, name.encode())
            episode = {"id": int(_h5_attribute(group, "id", int(name.removeprefix("episode_"))))}
            whole = False
            try:
                items = _h5_items(group)
                size = _h5_nbytes(items)
                whole = size <= budget
                budget = budget - size if whole else -1
                for key, item in items.items():
                    lazy = not whole and key in ("observations", "actions")
                    episode[key] = h5_read(item, shape_only=lazy)
            except (OSError, KeyError) as error:
                episode["error"] = f"cannot read episode (truncated file?): {error}"
                whole = False
            yield episode, whole


def _h5_items(group: Any) -> dict[str, Any]:
    """An HDF5 group's datasets by name, not read yet: each its low-level id and an empty
    array of its shape and type (None for a dataset without a shape); nested groups as
    nested dicts."""
    import h5py

    items: dict[str, Any] = {}
    for name in group:
        item = h5py.h5o.open(group, name)
        if isinstance(item, h5py.h5g.GroupID):
            items[name.decode()] = _h5_items(item)
            continue
        shape = item.get_space().shape
        items[name.decode()] = (item, None if shape is None else np.empty(shape, item.dtype))
    return items


def _h5_nbytes(items: dict[str, Any]) -> int:
    return sum(0 if empty is None else empty.nbytes for _, empty in leaves(items))


def h5_read(item: Any, shape_only: bool = False) -> Any:
    """A dataset's values (a dict of them for a group); `shape_only`: the empty array of
    its shape and type (NumPy does not touch an empty array's pages)."""
    import h5py

    if isinstance(item, dict):
        return {name: h5_read(inner, shape_only) for name, inner in item.items()}
    dataset, values = item
    if shape_only:
        return values
    if values is not None and values.ndim and values.dtype.kind in "biuf":
        if values.size:  # numbers and flags: straight into the array
            dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
        return values
    return h5py.Dataset(dataset)[()]  # scalars, strings, anything else: as h5py reads them


def _h5_attribute(group: Any, name: str, default: Any) -> Any:
    import h5py

    if not h5py.h5a.exists(group, name.encode()):
        return default
    attribute = h5py.h5a.open(group, name.encode())
    if attribute.dtype.kind not in "biuf":
        return h5py.Group(group).attrs[name]
    value = np.empty(attribute.shape, dtype=attribute.dtype)
    attribute.read(value)
    return value[()] if value.ndim == 0 else value


def episode_names(handle: Any) -> list[str]:
    names = [n for n in handle if n.startswith("episode_")]
    return sorted(names, key=lambda n: int(n.removeprefix("episode_")))


def first_row(data_file: str, episode_id: int, name: str) -> np.ndarray:
    """Row 0 of one array of one episode (a frame the plan did not read)."""
    import h5py

    with h5py.File(data_file, "r") as handle:
        return np.asarray(handle[f"episode_{episode_id}/{name}"][0])


def leaves(values: Any) -> list[Any]:
    """The arrays of a value: itself, or every array of a (nested) dict."""
    if isinstance(values, dict):
        return [leaf for inner in values.values() for leaf in leaves(inner)]
    return [values]
