"""Columns of encoded images in step tables (Parquet): binary PNG/JPEG/WebP bytes, or a
`{bytes, path}` struct as Hugging Face datasets and LeRobot store image features. Their
frames are stored as they came; each column is a camera named after it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import storage
from engine.sources.images import ImageColumn, camera_name, encoded_camera
from engine.sources.step_files import ColumnMap, read_step_file
from engine.validate import Problem
from schemas.frames import CameraInfo, FrameError, sniff_codec


def is_image_type(data_type: pa.DataType) -> bool:
    """Binary, or a struct with a binary `bytes` field (Hugging Face / LeRobot images)."""
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    if pa.types.is_struct(data_type):
        index = data_type.get_field_index("bytes")
        return index >= 0 and any(is_(data_type.field(index).type) for is_ in binary)
    return any(is_(data_type) for is_ in binary)


def image_bytes(column: pa.ChunkedArray) -> list[bytes | None]:
    """The encoded images of an image column, one per row (None where missing)."""
    array = column.combine_chunks()
    if pa.types.is_struct(array.type):
        array = pc.struct_field(array, "bytes")
    return array.to_pylist()


def image_columns(
    path: str, format: str, schema: pa.Schema, column_map: ColumnMap = ColumnMap()
) -> tuple[list[ImageColumn], dict[str, CameraInfo], list[Problem]]:
    """The columns of encoded images, recognized by their first frame's magic number (a
    binary column of something else stays an info column), and their cameras: codec,
    size and channels read from that frame. `schema` has hindsight's names (`--map`)."""
    images: list[ImageColumn] = []
    cameras: dict[str, CameraInfo] = {}
    problems: list[Problem] = []
    for name in [f.name for f in schema if is_image_type(f.type)]:
        first = first_image(path, format, name, column_map)
        if first is None or sniff_codec(first) is None:
            continue
        camera = camera_name(name)
        if camera in cameras:
            taken = next(i.source for i in images if i.camera == camera)
            problems.append(
                Problem(
                    path,
                    name,
                    f"its camera name {camera!r} is taken by column {taken!r}; rename one",
                )
            )
            continue
        try:
            cameras[camera] = encoded_camera(first, f"{path}: column {name!r}: first frame")
        except FrameError as error:
            problems.append(Problem(path, name, str(error)))
            continue
        images.append(ImageColumn(name, camera, encoded=True))
    return images, cameras, problems


def first_image(
    path: str, format: str, name: str, column_map: ColumnMap = ColumnMap()
) -> bytes | None:
    """The first frame of an image column: Parquet is read a row group at a time, up to the
    first row that holds one."""
    if format != "parquet":
        table = read_step_file(path, format, [name], column_map=column_map)
        return next((v for v in image_bytes(table.column(name)) if v), None)
    fs, key = storage.filesystem(path)
    try:
        with fs.open_input_file(key) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(
                batch_size=256, columns=[column_map.source(name)]
            ):
                found = next(
                    (v for v in image_bytes(pa.chunked_array([batch.column(0)])) if v), None
                )
                if found is not None:
                    return found
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(
            f"{path}: cannot read it as parquet (truncated or corrupt file?): {error}"
        ) from error
    return None
