"""The LeRobotDataset format: a pydantic model of `meta/info.json` and its path templates.

A LeRobot dataset is a directory (local or S3) holding `meta/info.json` (this model),
the frames as Parquet under `data/`, camera streams as MP4 under `videos/`, and metadata
about episodes and tasks under `meta/`. Two versions are in use (LeRobot's own code,
src/lerobot/datasets/utils.py and dataset_metadata.py, is the spec):

v3.0 (lerobot >= 0.4): many episodes per file, files grouped in chunks.
    data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet       one row per frame
    videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4   episodes back to back
    meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet    one row per episode:
        episode_index, tasks (list<string>), length, data/chunk_index, data/file_index,
        dataset_from_index, dataset_to_index (global frame `index` range [from, to)),
        videos/{video_key}/chunk_index, /file_index, /from_timestamp, /to_timestamp
        (the episode's span in its shared MP4, seconds), meta/episodes/chunk_index,
        /file_index, stats/... (per-episode statistics)
    meta/tasks.parquet      task text (pandas index `task`) -> task_index
    meta/stats.json         per-feature statistics (mean, std, min, max, count, q01...)

v2.1 (lerobot <= 0.3): one Parquet and one MP4 per episode, JSON Lines metadata.
    data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet
    videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4
    meta/episodes.jsonl         {"episode_index", "tasks": [text, ...], "length"}
    meta/tasks.jsonl            {"task_index", "task"}
    meta/episodes_stats.jsonl   {"episode_index", "stats": {feature: {...}}}
    where episode_chunk = episode_index // chunks_size.

Every frame row holds the features whose dtype is not `video` plus the default ones
(`timestamp` seconds from the episode's start, `frame_index` within the episode,
`episode_index`, `index` over the whole dataset, `task_index`). A `video` feature's frame
is the MP4 frame at `from_timestamp + timestamp` (v2.1: `timestamp`); an `image` feature
is stored in the Parquet as Hugging Face's Image struct {bytes: binary, path: string}.
"""

from __future__ import annotations

import string
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

CODEBASE_V30 = "v3.0"
CODEBASE_V21 = "v2.1"
CODEBASE_VERSIONS = (CODEBASE_V30, CODEBASE_V21)

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"

# v3.0 layout (LeRobot's DEFAULT_*_PATH).
CHUNK_FILE_PATTERN = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH_V30 = "data/" + CHUNK_FILE_PATTERN + ".parquet"
VIDEO_PATH_V30 = "videos/{video_key}/" + CHUNK_FILE_PATTERN + ".mp4"
EPISODES_DIR_V30 = "meta/episodes"
EPISODES_PATH_V30 = EPISODES_DIR_V30 + "/" + CHUNK_FILE_PATTERN + ".parquet"
TASKS_PATH_V30 = "meta/tasks.parquet"

# v2.1 layout (LeRobot 0.3's DEFAULT_PARQUET_PATH, DEFAULT_VIDEO_PATH, *_PATH).
DATA_PATH_V21 = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH_V21 = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
EPISODES_PATH_V21 = "meta/episodes.jsonl"
EPISODES_STATS_PATH_V21 = "meta/episodes_stats.jsonl"
TASKS_PATH_V21 = "meta/tasks.jsonl"

DEFAULT_CHUNKS_SIZE = 1000  # v3.0: files per chunk; v2.1: episodes per chunk
DEFAULT_DATA_FILES_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILES_SIZE_IN_MB = 200

# The columns LeRobot adds to every frame row, with their feature entries.
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

CAMERA_DTYPES = ("video", "image")
CAMERA_PREFIX = "observation.images."


def episodes_columns_v30(video_key: str) -> dict[str, str]:
    """The v3.0 episodes-table columns that place an episode in a camera's MP4 files."""
    prefix = f"videos/{video_key}/"
    return {
        "chunk_index": prefix + "chunk_index",
        "file_index": prefix + "file_index",
        "from_timestamp": prefix + "from_timestamp",
        "to_timestamp": prefix + "to_timestamp",
    }


def format_path(template: str, **values: Any) -> str:
    """Fill a path template (`data_path`, `video_path`, ...) with the values it names.

    Values it does not name are ignored, so one call serves both versions' templates;
    a name it needs and is not given is a ValueError naming the template."""
    needed = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = sorted(needed - values.keys())
    if missing:
        raise ValueError(f"path template {template!r} needs {', '.join(missing)}")
    return template.format(**{name: values[name] for name in needed})


class Feature(BaseModel):
    """One entry of `features`: a frame column (or a camera stream)."""

    model_config = ConfigDict(extra="allow")

    dtype: str  # float32, int64, bool, string, ..., or "video" / "image" for cameras
    shape: list[int] = Field(default_factory=lambda: [1])
    # Per-dimension names: a list, or (v2.0 datasets) {"motors": [...]}, or None.
    names: list[str | None] | dict[str, Any] | None = None
    # Cameras: {"video.fps", "video.height", "video.width", "video.channels",
    # "video.codec", "video.pix_fmt", "video.is_depth_map", "has_audio", ...}
    # (v2.1 keeps it under "video_info" for some datasets: see `video_info`).
    info: dict[str, Any] | None = None

    @property
    def is_camera(self) -> bool:
        return self.dtype in CAMERA_DTYPES

    @property
    def video_info(self) -> dict[str, Any]:
        """The camera's stream description, wherever this dataset's writer put it."""
        extra = self.model_extra or {}
        return dict(self.info or extra.get("video_info") or {})

    @property
    def size(self) -> int:
        """Values per frame (the product of the shape)."""
        size = 1
        for dim in self.shape:
            size *= int(dim)
        return size

    @property
    def image_hwc(self) -> tuple[int, int, int]:
        """A camera's (height, width, channels), reading `names` when it says the order
        (LeRobot writes ["height", "width", "channels"]; some datasets are channels first)."""
        if len(self.shape) != 3:
            raise ValueError(f"a camera's shape has 3 dimensions, not {self.shape}")
        names = self.names if isinstance(self.names, list) else None
        if names and names[0] == "channels":
            channels, height, width = self.shape
            return height, width, channels
        height, width, channels = self.shape
        return height, width, channels


class LeRobotInfo(BaseModel):
    """`meta/info.json` of a LeRobot dataset, v3.0 or v2.1.

    Unknown keys are kept (LeRobot adds fields over time); an unknown codebase_version is
    refused, because the file layout depends on it."""

    model_config = ConfigDict(extra="allow")

    codebase_version: str
    fps: int
    features: dict[str, Feature]
    robot_type: str | None = None
    total_episodes: int = 0
    total_frames: int = 0
    total_tasks: int = 0
    total_videos: int | None = None  # v2.1
    total_chunks: int | None = None  # v2.1
    chunks_size: int = DEFAULT_CHUNKS_SIZE
    data_files_size_in_mb: int | None = None  # v3.0
    video_files_size_in_mb: int | None = None  # v3.0
    data_path: str = DATA_PATH_V30
    video_path: str | None = None
    splits: dict[str, str] = Field(default_factory=dict)

    @field_validator("codebase_version")
    @classmethod
    def _known_version(cls, version: str) -> str:
        if version not in CODEBASE_VERSIONS:
            raise ValueError(
                f"unsupported codebase_version {version!r}; hindsight reads "
                f"{' and '.join(CODEBASE_VERSIONS)}"
            )
        return version

    @field_validator("fps", "chunks_size")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"must be positive, got {value}")
        return value

    # ---------------------------------------------------------------- constructors

    @classmethod
    def new(
        cls,
        fps: int,
        features: dict[str, dict[str, Any] | Feature],
        *,
        version: str = CODEBASE_V30,
        robot_type: str | None = None,
    ) -> LeRobotInfo:
        """An empty dataset's info with the version's default templates and sizes; the
        default frame columns (`DEFAULT_FEATURES`) are added where missing."""
        all_features = {
            **features,
            **{k: v for k, v in DEFAULT_FEATURES.items() if k not in features},
        }
        has_video = any(
            (f.dtype if isinstance(f, Feature) else f["dtype"]) == "video"
            for f in features.values()
        )
        v30 = version == CODEBASE_V30
        return cls(
            codebase_version=version,
            fps=fps,
            features=all_features,  # type: ignore[arg-type]
            robot_type=robot_type,
            data_path=DATA_PATH_V30 if v30 else DATA_PATH_V21,
            video_path=(VIDEO_PATH_V30 if v30 else VIDEO_PATH_V21) if has_video else None,
            data_files_size_in_mb=DEFAULT_DATA_FILES_SIZE_IN_MB if v30 else None,
            video_files_size_in_mb=DEFAULT_VIDEO_FILES_SIZE_IN_MB if v30 else None,
            total_videos=None if v30 else 0,
            total_chunks=None if v30 else 0,
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The dict to write as meta/info.json. Keys of the other version left unset are
        left out (LeRobot warns about unknown keys); `video_path: null` is kept, because
        LeRobot's default for a missing one is a template."""
        data = self.model_dump(mode="json")
        for key in (
            "total_videos",
            "total_chunks",
            "data_files_size_in_mb",
            "video_files_size_in_mb",
        ):
            if data.get(key) is None:
                data.pop(key, None)
        for feature in data["features"].values():
            if feature.get("info") is None:
                feature.pop("info", None)
        return data

    # ---------------------------------------------------------------- the layout

    @property
    def is_v30(self) -> bool:
        return self.codebase_version == CODEBASE_V30

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.dtype == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.dtype == "image"]

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.is_camera]

    def episode_chunk(self, episode_index: int) -> int:
        """v2.1: the chunk an episode's files are in."""
        return int(episode_index) // self.chunks_size

    def data_file(
        self, *, chunk_index: int = 0, file_index: int = 0, episode_index: int = 0
    ) -> str:
        """A data Parquet's path relative to the root: v3.0 by (chunk, file), v2.1 by
        episode."""
        return format_path(
            self.data_path,
            chunk_index=chunk_index,
            file_index=file_index,
            episode_index=episode_index,
            episode_chunk=self.episode_chunk(episode_index),
        )

    def video_file(
        self,
        video_key: str,
        *,
        chunk_index: int = 0,
        file_index: int = 0,
        episode_index: int = 0,
    ) -> str:
        """A camera's MP4 path relative to the root: v3.0 by (chunk, file), v2.1 by
        episode."""
        if self.video_path is None:
            raise ValueError(f"{INFO_PATH} has a video feature {video_key!r} but no video_path")
        return format_path(
            self.video_path,
            video_key=video_key,
            chunk_index=chunk_index,
            file_index=file_index,
            episode_index=episode_index,
            episode_chunk=self.episode_chunk(episode_index),
        )

    @property
    def tasks_path(self) -> str:
        return TASKS_PATH_V30 if self.is_v30 else TASKS_PATH_V21

    @property
    def episodes_path(self) -> str:
        """v3.0: the directory of the episodes Parquet files; v2.1: episodes.jsonl."""
        return EPISODES_DIR_V30 if self.is_v30 else EPISODES_PATH_V21
