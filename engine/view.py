"""Looking at frames: one episode's frames of a camera as uint8 arrays, and `hindsight view`'s
contact sheet of them, each frame with its step index, reward and chosen columns under it,
so that a user can see what a description or a label claims.

    from engine.view import episode_frames
    episode = episode_frames("data/pend-pix", 12)         # the only camera, every step
    episode.frames                                        # uint8 [steps, H, W, C]
    episode.steps                                         # polars: t, reward (+ columns)

Only the frames of the one episode are read (the query engine reads the row groups that
hold its rows), and each is decoded and checked against its camera; a video camera's
episode is its one video, decoded whole (schemas/video.py) and checked against the
episode's length.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from engine import storage
from engine.dataset import Dataset
from engine.query import query
from engine.query.read import as_dataset
from schemas import steps as cols
from schemas.frames import CameraInfo, decode_frame, frame_column
from schemas.video import decode_video

MAX_TILES = 64  # frames on a sheet when `every` is not given: every k-th step to fit
TILES_PER_ROW = 8
MIN_TILE_WIDTH = 128  # small frames are scaled up (nearest neighbour) to be seen
MAX_TILE_WIDTH = 256  # large ones scaled down
FONT_SIZE = 11
MARGIN = 4
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
BORDER = (190, 190, 190)


class ViewError(ValueError):
    """An episode or camera that is not there: one line saying what is."""


@dataclass(frozen=True)
class EpisodeFrames:
    """One episode's frames of one camera, with its step rows (t, reward, asked columns)."""

    episode_id: int
    camera: str
    info: CameraInfo
    frames: np.ndarray  # uint8 [steps, H, W, C]
    steps: pl.DataFrame  # one row per frame: t, reward and the asked columns


def choose_camera(dataset: Dataset, camera: str | None) -> tuple[str, CameraInfo]:
    """`camera`, or the dataset's only camera; a ViewError names the cameras there are."""
    cameras = dataset.cameras
    if not cameras:
        raise ViewError(f"{dataset.uri} has no camera frames (collect --frames HxW records them)")
    if camera is None:
        if len(cameras) > 1:
            raise ViewError(
                f"{dataset.uri} has cameras {', '.join(cameras)}: choose one (--camera)"
            )
        camera = next(iter(cameras))
    if camera not in cameras:
        raise ViewError(f"{dataset.uri} has no camera {camera!r}; cameras: {', '.join(cameras)}")
    return camera, cameras[camera]


def episode_frames(
    dataset: Dataset | str,
    episode_id: int,
    camera: str | None = None,
    columns: Sequence[str] = (),
    every: int = 1,
) -> EpisodeFrames:
    """Every `every`-th step's frame of episode `episode_id` (decoded, uint8 [n, H, W, C]),
    with t, reward and `columns` (step or episode columns) of those steps."""
    dataset = as_dataset(dataset)
    camera, info = choose_camera(dataset, camera)
    if every < 1:
        raise ViewError(f"every must be at least 1, got {every}")
    wanted = list(dict.fromkeys([cols.T, cols.REWARD, *columns]))
    where = f"{cols.EPISODE_ID} = {int(episode_id)}"
    if every > 1:  # only the frames shown are taken from the files and decoded
        where += f" AND {cols.T} % {int(every)} = 0"
    images = [] if info.is_video else [frame_column(camera)]
    steps = query(dataset, where, select=[*wanted, *images]).frame
    if not steps.height:
        raise ViewError(f"{dataset.uri} has no episode {episode_id}{_id_range(dataset)}")
    steps = steps.sort(cols.T)
    if info.is_video:
        video = episode_video(dataset, int(episode_id), camera)
        frames = video[steps[cols.T].to_numpy()]
        return EpisodeFrames(int(episode_id), camera, info, frames, steps)
    frames = np.empty((steps.height, *info.shape), dtype=np.uint8)
    for i, (t, data) in enumerate(zip(steps[cols.T], steps[frame_column(camera)])):
        where = f"{dataset.uri} episode {episode_id} step {t} column {frame_column(camera)}"
        frames[i] = decode_frame(data, info, where)
    return EpisodeFrames(int(episode_id), camera, info, frames, steps.drop(frame_column(camera)))


def episode_video(dataset: Dataset, episode_id: int, camera: str) -> np.ndarray:
    """Every frame of one episode's video (a video camera), decoded and checked against
    the episode's length: uint8 [length, H, W, C]. Only the parts whose episode ids span
    `episode_id` are opened."""
    info, column = dataset.cameras[camera], frame_column(camera)
    group = dataset.group_of(column, "episodes")
    for index, part in enumerate(dataset.manifest.parts):
        if not part.min_episode_id <= episode_id <= part.max_episode_id:
            continue
        ids = dataset.read_part(index, "episodes", [cols.EPISODE_ID, cols.LENGTH])
        rows = np.flatnonzero(ids.column(cols.EPISODE_ID).to_numpy() == episode_id)
        if len(rows):
            row = int(rows[0])
            data = dataset.read_part(index, "episodes", [column]).column(column)[row].as_py()
            uri = dataset.file_uris(group, "episodes")[index]
            length = ids.column(cols.LENGTH)[row].as_py()
            return decode_video(
                data, info, f"{uri}: episode {episode_id} camera {camera!r}", length
            )
    raise ViewError(f"{dataset.uri} has no episode {episode_id}{_id_range(dataset)}")


def _id_range(dataset: Dataset) -> str:
    parts = dataset.manifest.parts
    if not parts:
        return ""
    low = min(p.min_episode_id for p in parts)
    high = max(p.max_episode_id for p in parts)
    return f" (episode ids {low}..{high}, {dataset.manifest.episodes} episodes)"


# ---------------------------------------------------------------- the contact sheet


def _text(value: Any) -> str:
    """A value as short text: numbers with 3 significant digits, vectors in brackets."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _fit(text: str, font: Any, width: int) -> str:
    """`text` cut (with an ellipsis) to `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def caption_lines(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    """What is written under a frame: its step, its reward, then each chosen column."""
    reward = row[cols.REWARD]  # None: unknown (a dataset ingested without rewards)
    lines = [f"t={row[cols.T]}  r={'?' if reward is None else _text(float(reward))}"]
    lines += [f"{name}={_text(row[name])}" for name in columns if name not in (cols.T, cols.REWARD)]
    return lines


def contact_sheet(
    episode: EpisodeFrames, columns: Sequence[str] = (), per_row: int = TILES_PER_ROW
) -> Any:
    """A PIL image: the episode's frames in rows of `per_row`, each with its caption."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=FONT_SIZE)
    count, height, width, _ = episode.frames.shape
    scale = (
        max(MIN_TILE_WIDTH / width, 1.0)
        if width < MIN_TILE_WIDTH
        else min(MAX_TILE_WIDTH / width, 1.0)
    )
    scale = math.floor(scale) if scale >= 1 else scale  # whole pixels when scaled up
    tile_width, tile_height = max(1, round(width * scale)), max(1, round(height * scale))
    rows = episode.steps.to_dicts()
    captions = [caption_lines(row, columns) for row in rows]
    line_height = FONT_SIZE + 3
    caption_height = line_height * max(len(lines) for lines in captions) + MARGIN
    cell_width, cell_height = tile_width + 2 * MARGIN, tile_height + caption_height + 2 * MARGIN
    per_row = max(1, min(per_row, count))
    header = line_height + 2 * MARGIN
    sheet = Image.new(
        "RGB",
        (per_row * cell_width, header + math.ceil(count / per_row) * cell_height),
        BACKGROUND,
    )
    draw = ImageDraw.Draw(sheet)
    info = episode.info
    draw.text(
        (MARGIN, MARGIN),
        _fit(
            f"episode {episode.episode_id}, camera {episode.camera} "
            f"({info.height}x{info.width}, {info.codec}), {count} frames",
            font,
            sheet.width - 2 * MARGIN,
        ),
        fill=TEXT,
        font=font,
    )
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    for index, (frame, lines) in enumerate(zip(episode.frames, captions)):
        image = Image.fromarray(frame[:, :, 0] if frame.shape[2] == 1 else frame).convert("RGB")
        if (tile_width, tile_height) != (width, height):
            image = image.resize((tile_width, tile_height), resample)
        left = (index % per_row) * cell_width + MARGIN
        top = header + (index // per_row) * cell_height + MARGIN
        sheet.paste(image, (left, top))
        draw.rectangle(
            (left - 1, top - 1, left + tile_width, top + tile_height), outline=BORDER, width=1
        )
        for number, line in enumerate(lines):
            position = (left, top + tile_height + 2 + number * line_height)
            draw.text(position, _fit(line, font, tile_width), fill=TEXT, font=font)
    return sheet


def view_episode(
    dataset: Dataset | str,
    episode_id: int,
    output: str,
    camera: str | None = None,
    every: int | None = None,
    columns: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the contact sheet of an episode to the PNG file `output` (a local path or
    s3://); what it shows.
    Without `every`, every k-th step so that at most MAX_TILES frames are shown."""
    dataset = as_dataset(dataset)
    camera, _ = choose_camera(dataset, camera)
    if every is None:
        length = _episode_length(dataset, episode_id)
        every = max(1, math.ceil(length / MAX_TILES))
    episode = episode_frames(dataset, episode_id, camera, columns, every)
    sheet = contact_sheet(episode, columns)
    png = io.BytesIO()
    sheet.save(png, format="PNG")
    storage.write_bytes(storage.normalize(output), png.getvalue())  # a local path or s3://
    return {
        "output": output,
        "dataset": dataset.uri,
        "episode": episode.episode_id,
        "camera": episode.camera,
        "every": every,
        "frames": len(episode.frames),
        "steps": episode.steps[cols.T].to_list(),
        "width": sheet.width,
        "height": sheet.height,
    }


def _episode_length(dataset: Dataset, episode_id: int) -> int:
    found = query(
        dataset, f"{cols.EPISODE_ID} = {int(episode_id)}", level="episodes", select=[cols.LENGTH]
    ).frame
    if not found.height:
        raise ViewError(f"{dataset.uri} has no episode {episode_id}{_id_range(dataset)}")
    return int(found[cols.LENGTH][0])
