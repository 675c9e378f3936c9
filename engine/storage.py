"""Where bytes live: local paths and `s3://` URIs behind one small interface.

S3 goes through pyarrow.fs with the standard AWS environment (`AWS_ENDPOINT_URL` for MinIO,
moto or other S3-compatible stores; credentials from the usual variables). Credentials are
never stored in anything we write. Every floor reads and writes objects through these
functions; the one other S3 client is Polars' own Parquet reader behind `engine.scan` (for
exploring in Python; no job reads through it), which gets its settings from
`polars_storage_options` here. Each S3 request is retried inside pyarrow's client (AWS's
standard strategy); a read that drops mid-object is resumed by `open_input` with the one
retry policy of schemas/retry.py.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import posixpath
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from schemas.manifest import public_url
from schemas.retry import ATTEMPTS, retrying


class StorageError(RuntimeError):
    """An I/O problem, with the URI it concerns."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """An absolute local path or an `s3://bucket/key` URI without a trailing slash."""
    if is_s3(uri):
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(uri, *parts)


def _key_relpath(uri: str, root: str) -> str:
    """A relative path between two S3 URIs, by their keys made absolute ("/bucket/key"):
    posixpath.relpath would otherwise consult the working directory, which a Ray job's
    process may not have."""
    return posixpath.relpath("/" + uri.removeprefix("s3://"), "/" + root.removeprefix("s3://"))


def _bucket(uri: str) -> str:
    return uri.removeprefix("s3://").split("/", 1)[0]


def relative_to(directory_uri: str, uri: str) -> str:
    """`uri` as a path relative to `directory_uri` when both are in one S3 bucket or share
    a local directory below `/` (symlinks resolved), so the two can be moved or copied
    together; else `uri`."""
    directory_uri, uri = normalize(directory_uri), normalize(uri)
    if is_s3(directory_uri) != is_s3(uri):
        return uri
    if is_s3(uri):
        if _bucket(uri) != _bucket(directory_uri):
            return uri
        return _key_relpath(uri, directory_uri)
    directory_uri, uri = os.path.realpath(directory_uri), os.path.realpath(uri)
    if os.path.commonpath([directory_uri, uri]) == os.path.sep:
        return uri  # nothing in common but the root (another disk): keep it absolute
    return os.path.relpath(uri, directory_uri)


def resolve(directory_uri: str, path: str) -> str:
    """A path stored by `relative_to` as a full URI again (an absolute one is kept)."""
    if is_s3(path) or os.path.isabs(path):
        return normalize(path)
    if is_s3(directory_uri):
        key = posixpath.normpath(posixpath.join("/" + directory_uri.removeprefix("s3://"), path))
        return f"s3:/{key}"
    return os.path.normpath(os.path.join(os.path.realpath(normalize(directory_uri)), path))


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs)


def s3_endpoint() -> str | None:
    """AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; StorageError when it holds a user, password
    or query: S3 signs requests with the AWS keys, and S3 clients print the endpoint in
    their errors, where a credential in it would be shown."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and public_url(endpoint) != endpoint:
        raise StorageError(
            f"the S3 endpoint {public_url(endpoint)} is given with a user, password or query "
            "in AWS_ENDPOINT_URL(_S3); give it without them, and the credentials in "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an AWS profile)"
        )
    return endpoint


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI and the path within it."""
    if is_s3(uri):
        endpoint = s3_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return _s3_filesystem(endpoint, region), uri[len("s3://") :]
    return pafs.LocalFileSystem(), normalize(uri)


def polars_storage_options(uri: str) -> dict[str, str] | None:
    """Options for `polars.scan_parquet` on S3, taken from the AWS environment."""
    if not is_s3(uri):
        return None
    options = {}
    endpoint = s3_endpoint()
    if endpoint:
        options["aws_endpoint_url"] = endpoint
    names = {
        "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
        "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
        "aws_session_token": ("AWS_SESSION_TOKEN",),
        "aws_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    }
    for option, env_names in names.items():
        for env_name in env_names:
            if os.environ.get(env_name):
                options[option] = os.environ[env_name]
                break
    options.setdefault("aws_region", "us-east-1")
    if options.get("aws_endpoint_url", "").startswith("http://"):
        options["aws_allow_http"] = "true"
    return options


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(uri: str) -> int | None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return None if info.type == pafs.FileType.NotFound else info.size


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except (FileNotFoundError, OSError) as error:
        raise StorageError(f"cannot read {uri}: {error}") from error


# AWS errors that another try cannot fix; pyarrow reports S3 failures as OSError (no errno)
# with the AWS error name in the message.
_PERMANENT_S3_ERRORS = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "NO_SUCH_BUCKET",
    "NO_SUCH_KEY",
    "RESOURCE_NOT_FOUND",
)


def is_transient(error: BaseException) -> bool:
    """Whether another try may succeed: a dropped, refused or timed-out connection, a network
    or server error of S3; not a missing object, a denied access, a local disk error or a
    stale writer."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and error.errno is None:
        message = str(error)
        return not any(name in message for name in _PERMANENT_S3_ERRORS)
    return False


class ResumableInput(io.RawIOBase):
    """A read-only file over pyarrow.fs (local or S3) that survives a dropped connection: a
    read that fails transiently (after pyarrow's own retries of the request) reopens the
    object at the byte where it stopped, with the retry policy of schemas/retry.py.
    `retries` counts the reopenings. Errors are StorageError naming the URI and byte."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        self.position = 0
        self.retries = 0
        # Opening is not retried here: pyarrow's client has already retried the request, and
        # there is nothing to resume yet.
        try:
            self._source: pa.NativeFile | None = self._open()
        except OSError as error:
            raise StorageError(f"cannot read {uri}: {error}") from error

    def _open(self) -> pa.NativeFile:
        """The object, opened at `self.position`."""
        fs, path = filesystem(self.uri)
        source = fs.open_input_file(path)
        if self.position:
            source.seek(self.position)
        return source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        def read_once() -> int:
            if self._source is None:
                self.retries += 1
                self._source = self._open()
            try:
                return self._source.readinto(buffer)
            except BaseException:
                self._close_source()  # the next try reopens at self.position
                raise

        count = self._with_retries(read_once)
        self.position += count
        return count

    def _with_retries(self, action: Callable[[], int]) -> int:
        try:
            return retrying(is_transient)(action)
        except OSError as error:
            attempts = f" after {ATTEMPTS} attempts" if is_transient(error) else ""
            raise StorageError(
                f"reading {self.uri} failed at byte {self.position}{attempts}: {error}"
            ) from error

    def _close_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            try:
                source.close()
            except OSError:
                pass  # a broken connection may not close cleanly; it is dropped either way

    def close(self) -> None:
        self._close_source()
        super().close()


def open_input(uri: str, buffer_size: int | None = None) -> io.BufferedReader:
    """A buffered binary file reading `uri` front to back (local or S3, no temporary copy),
    resumed where it stopped if the connection drops (`ResumableInput`). Each buffer fill is
    one read; on S3 one ranged GET, so the default buffer there is larger (8 MiB)."""
    if buffer_size is None:
        buffer_size = 8 << 20 if is_s3(uri) else 1 << 20
    return io.BufferedReader(ResumableInput(uri), buffer_size=buffer_size)


def write_bytes(uri: str, data: bytes, before_commit: Callable[[], None] | None = None) -> None:
    """Write a whole object so readers never see part of it.

    Locally: a temporary file in the same directory, then an atomic rename.
    On S3 a single PUT is already atomic. `before_commit` runs just before the object
    appears (the rename, or the PUT); if it raises, nothing appears.
    """
    fs, path = filesystem(uri)
    if is_s3(uri):
        if before_commit:
            before_commit()
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        _recheck_after_commit(fs, path, before_commit)
        return
    _write_local(path, lambda handle: handle.write(data), before_commit)


def _recheck_after_commit(
    fs: pafs.FileSystem, path: str, before_commit: Callable[[], None] | None
) -> None:
    """Run the fence once more now that the object exists; if it fails, take the object
    back. With `discard_staging` removing the marker last and then listing again, a file
    that lands while its run is being discarded is removed by one side or the other."""
    if before_commit is None:
        return
    try:
        before_commit()
    except StaleWriterError:
        fs.delete_file(path)
        raise


def _write_local(
    path: str, produce: Callable[[BinaryIO], Any], before_commit: Callable[[], None] | None
) -> None:
    """A temporary file next to `path`, fsynced, then renamed onto it; the temporary file
    never stays. `before_commit` runs before anything is made and again before the rename:
    a stale writer (see `check_staging`) leaves nothing."""
    if before_commit:
        before_commit()
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "wb") as handle:
            produce(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_commit:
            before_commit()
        os.replace(temporary, path)
        _recheck_after_commit(pafs.LocalFileSystem(), path, before_commit)
    except OSError as error:  # a full disk, a permission: say which file
        raise StorageError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size


def write_stream(
    uri: str,
    produce: Callable[[BinaryIO], None],
    before_commit: Callable[[], None] | None = None,
) -> tuple[int, str]:
    """Write an object that `produce` streams into a file, atomically as `write_bytes`
    does, and return its size and sha256 (computed on the way, not by reading back)."""
    if is_s3(uri):
        buffer = io.BytesIO()
        produce(buffer)
        data = buffer.getvalue()
        write_bytes(uri, data, before_commit)
        return len(data), sha256_bytes(data)
    writers: list[_HashingWriter] = []

    def hashed(handle: BinaryIO) -> None:
        writers.append(_HashingWriter(handle))
        produce(writers[0])

    _write_local(normalize(uri), hashed, before_commit)
    return writers[0].size, writers[0].digest.hexdigest()


# ---------------------------------------------------------------- staging markers

STAGING_MARKER = "_staging"


class StaleWriterError(StorageError):
    """A task of a run that no longer owns the directory it writes into."""


def start_staging(directory_uri: str) -> str:
    """Mark a directory as being written by a new run; return the run's token.

    Every task of the run carries the token and checks it (`check_staging`) just before
    a file of its appears. A task of an earlier run that died (a Ray worker outliving its
    killed driver) then cannot overwrite the files of the re-run, nor add files to a
    committed directory, whose marker is gone.
    """
    token = f"{datetime.datetime.now(datetime.timezone.utc).isoformat()} {uuid.uuid4().hex}"
    write_bytes(join(directory_uri, STAGING_MARKER), token.encode())
    return token


def staging_token(directory_uri: str) -> str | None:
    """The token of the run writing a directory now, or None if none is."""
    marker = join(directory_uri, STAGING_MARKER)
    return read_bytes(marker).decode() if exists(marker) else None


def check_staging(directory_uri: str, token: str) -> None:
    """Raise StaleWriterError unless the run with `token` still owns the directory."""
    if staging_token(directory_uri) != token:
        raise StaleWriterError(
            f"{directory_uri}: another run has started writing here, or the version was "
            "committed or removed, since this task's run began; its file is not written"
        )


def discard_staging(directory_uri: str, token: str | None) -> None:
    """Remove what a failed run wrote, unless another run has taken the directory over."""
    if token is None:
        delete_tree(directory_uri)
        return
    if staging_token(directory_uri) != token:
        return
    # The marker goes last: if this process is killed half-way, what stays still says it
    # is a dead run's staging (so a re-run may clear it) and never looks like foreign data.
    fs, path = filesystem(directory_uri)
    marker = filesystem(join(directory_uri, STAGING_MARKER))[1]
    for entry in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if entry.type == pafs.FileType.Directory:
            fs.delete_dir(entry.path)  # a column group's parts, deleted in batches on S3
        elif entry.path != marker:
            fs.delete_file(entry.path)
    end_staging(directory_uri)
    # A task that passed its fence before the marker went may have landed a file since;
    # one landing after this sees no marker and removes its own (`_recheck_after_commit`).
    delete_tree(directory_uri)


def end_staging(directory_uri: str) -> None:
    marker = join(directory_uri, STAGING_MARKER)
    if exists(marker):
        fs, path = filesystem(marker)
        fs.delete_file(path)


def sha256_bytes(data: bytes | pa.Buffer) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def sha256_uri(uri: str, chunk_size: int = 8 << 20) -> str:
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(uri: str) -> list[str]:
    """Every file below a directory URI (recursively), as URIs, sorted."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(
        prefix + info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File
    )


def delete_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(path)
