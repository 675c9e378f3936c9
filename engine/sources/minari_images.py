"""Cameras in a Minari dataset: which observation arrays are images, stored as JPEG by
Minari (kept as they came) or raw uint8 (encoded at ingest), and their checks."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from engine.sources.base import PlanOptions
from engine.sources.images import (
    ImageColumn,
    camera_name,
    encoded_camera,
    image_array_problems,
    is_image_array,
    raw_camera,
)
from engine.sources.minari_hdf5 import first_row
from engine.validate import Problem
from schemas.frames import CameraInfo


def jpeg_keys(metadata: dict[str, Any]) -> tuple[str, ...]:
    """The observation keys ("" for the whole observation) Minari stores as JPEG: image
    spaces (minari's `is_image_space`) of an HDF5 dataset written with jpeg_encoding."""
    if metadata.get("data_format", "hdf5") != "hdf5" or not metadata.get("jpeg_encoding", True):
        return ()
    space = metadata.get("observation_space")
    space = json.loads(space) if isinstance(space, str) else space or {}
    spaces = space.get("subspaces", {}) if space.get("type") == "Dict" else {"": space}
    return tuple(key for key, inner in spaces.items() if _is_image_space(inner))


def _is_image_space(space: Any) -> bool:
    shape = space.get("shape") or [] if isinstance(space, dict) else []
    return (
        space.get("type") == "Box"
        and space.get("dtype") == "uint8"
        and len(shape) in (2, 3)
        and shape[0] >= 32
        and shape[1] >= 32
        and bool(np.all(np.asarray(space.get("low")) == 0))
        and bool(np.all(np.asarray(space.get("high")) == 255))
    )


def observation_leaves(observations: Any) -> dict[str, Any]:
    """An episode's observation arrays by key ("" for an observation that is one array)."""
    return dict(observations) if isinstance(observations, dict) else {"": observations}


def image_key(image: ImageColumn) -> str:
    return image.source.removeprefix("observations").removeprefix("/")


def without_images(observations: Any, images: tuple[ImageColumn, ...]) -> Any:
    """The observation without its cameras: an array, a dict, or None when nothing is left."""
    keys = {image_key(image) for image in images}
    if not isinstance(observations, dict):
        return None if "" in keys else observations
    left = {key: values for key, values in observations.items() if key not in keys}
    return left or None


def episode_images(
    file: str, jpeg_keys: tuple[str, ...], episode: dict[str, Any], options: PlanOptions
) -> tuple[list[ImageColumn], dict[str, CameraInfo]]:
    """The cameras of a dataset, from its first episode: observation arrays Minari stored
    as JPEG, and raw uint8 (n+1, H, W[, C]) arrays."""
    images, cameras = [], {}
    for key, values in observation_leaves(episode["observations"]).items():
        source = "observations" + (f"/{key}" if key else "")
        encoded = key in jpeg_keys
        if not encoded and not is_image_array(values.dtype, values.shape):
            continue
        image = ImageColumn(source, camera_name(key) if key else "observation", encoded)
        if encoded:
            first = values[0] if len(values) and values[0] is not None else None
            if first is None or not np.asarray(first).size:  # not read by the plan: read it
                first = first_row(file, episode["id"], source)
            where = f"{file}: episode {episode['id']}, step 0: column {source!r}"
            cameras[image.camera] = encoded_camera(np.asarray(first).tobytes(), where)
        else:
            cameras[image.camera] = raw_camera(values.shape, options.codec, options.quality)
        images.append(image)
    return images, cameras


def check_images(
    file: str, episode: dict[str, Any], images: list[ImageColumn], cameras: dict[str, CameraInfo]
) -> list[Problem]:
    """Raw frames of every episode have the camera's size; arrays that look like images
    but are not uint8 are refused (encoded frames are checked when their part is read)."""
    problems = []
    leaves_by_key = observation_leaves(episode["observations"])
    for key, values in leaves_by_key.items():
        column = "observations" + (f"/{key}" if key else "")
        problems += image_array_problems(file, column, values.dtype, values.shape, episode["id"])
    for image in images:
        camera = cameras[image.camera]
        values = leaves_by_key.get(image_key(image))
        if image.encoded or values is None:
            continue
        shape = tuple(values.shape[1:]) + (() if values.ndim == 4 else (1,))
        if shape != camera.shape:
            problems.append(
                Problem(
                    file,
                    image.source,
                    f"frames of shape {shape}, but the first episode's are {camera.shape}; "
                    "every frame of a camera has one size",
                    episode["id"],
                )
            )
    return problems
