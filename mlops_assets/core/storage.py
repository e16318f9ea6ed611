"""The platform's files on any storage: a local folder, `s3://bucket/prefix` or `memory://`.

Every path the platform reads or writes (data root, landing folder, batch store, features,
reports, profiles, the prediction log, metrics files) goes through these functions, which take
a local path or an fsspec URL as a string and work on its UPath (universal-pathlib) with the
platform's storage options. What differs between a folder and an object store is decided here,
once:

- writing: a file appears whole or not at all. On a local folder it is written under a hidden
  temporary name in the same folder and renamed (atomic on one file system); on an object store
  a rename is a copy, so the object is put in one request (a put is atomic per object: readers
  see the old object or the new one, never half of one);
- folders: object stores have none, so `makedirs` does nothing there (and never creates a bucket);
- listings: an object store's listing is not cached, since other processes (serving replicas,
  other runs) add files a cached listing would hide.

Credentials never go in a URL: S3 takes them from the standard AWS variables or files
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `AWS_ENDPOINT_URL` for a
non-AWS endpoint), read by botocore itself; `check_url` refuses a URL that carries one.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, cast

from fsspec import AbstractFileSystem
from upath import UPath

from mlops_assets.core.redaction import has_credentials, redact_uri

# Protocols whose rename is a copy and whose listings other writers change behind a cache.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
_LOCAL = frozenset({"", "file", "local"})


class StorageURLError(ValueError):
    """A storage setting that cannot be used as given (for example, credentials inside the URL)."""


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an fsspec URL without losing the scheme."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def protocol(url: str) -> str:
    """The URL's scheme ("s3", "memory", ...); "file" for a local path."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head else "file"


def is_local(url: str) -> bool:
    return protocol(url) in _LOCAL


def is_object_store(url: str) -> bool:
    return protocol(url) in OBJECT_STORES


def check_url(name: str, url: str) -> str:
    """`url` if it may be used for storage; a URL with credentials in it is refused, naming the
    setting, since URLs end up in metadata, logs and MLflow (give them as AWS_* variables)."""
    if has_credentials(url):
        raise StorageURLError(
            f"{name}={redact_uri(url)} carries a credential in the URL; URLs are shown in metadata and "
            "logs: give object-store credentials through the environment instead (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and AWS_ENDPOINT_URL for a non-AWS endpoint)")
    return url


def storage_options(url: str) -> dict[str, Any]:
    """The fsspec options the platform opens `url` with."""
    return {"use_listings_cache": False} if is_object_store(url) else {}


def upath(url: str) -> UPath:
    """The UPath of a local path or URL (local paths made absolute)."""
    path = UPath(url, **storage_options(url))
    return path.absolute() if is_local(url) and not path.is_absolute() else path


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """(the file system of `url`, the path on it), as `fsspec.core.url_to_fs` gives them."""
    path = upath(url)
    return path.fs, path.path


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


@contextmanager
def open_url(url: str, mode: str = "rb") -> Iterator[IO[Any]]:
    """Open a file for reading (or for a plain, non-atomic write); see `atomic_writer` for writes."""
    fs, path = filesystem(url)
    with fs.open(path, mode) as handle:
        yield handle


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return bytes(fs.cat_file(path))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def makedirs(url: str) -> None:
    """Create the folder `url` (and its parents) on a file system that has folders."""
    if is_object_store(url):
        return  # no folders; s3fs would create a missing *bucket* here, which is not ours to do
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


@contextmanager
def atomic_writer(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """A handle whose content appears at `url` whole, when the block ends without an error.

    Local folders (and memory://): written as a hidden temporary file beside the target, then
    renamed over it. Object stores: buffered in memory and put in one request when the block
    ends (the platform's files are small), so an error inside the block leaves nothing behind.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer writes ('wb' or 'w'), got mode {mode!r}")
    fs, path = filesystem(url)
    if is_object_store(url):
        buffer: io.BytesIO | io.StringIO = io.BytesIO() if mode == "wb" else io.StringIO()
        yield cast(IO[Any], buffer)
        value = buffer.getvalue()
        fs.pipe_file(path, value if isinstance(value, bytes) else value.encode("utf-8"))
        return
    parent = _parent(path)
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
        if is_local(url):
            os.replace(tmp, path)  # atomic, and replaces an existing file on every platform
        else:
            fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_bytes(url: str, data: bytes) -> str:
    """Write (or replace) the file at `url` atomically; return `url`."""
    if is_object_store(url):
        fs, path = filesystem(url)
        fs.pipe_file(path, data)  # one PUT: atomic per object
        return url
    with atomic_writer(url) as handle:
        handle.write(data)
    return url


def write_text(url: str, text: str) -> str:
    return write_bytes(url, text.encode("utf-8"))


def write_json(url: str, body: Any, **dumps: Any) -> str:
    return write_bytes(url, json.dumps(body, **{"indent": 1, "default": str, **dumps}).encode("utf-8"))


def write_once(url: str, data: bytes) -> bool:
    """Write `data` to `url` unless a file is there already (addresses that are versions hold the
    same bytes when they exist); True when written."""
    if exists(url):
        return False
    write_bytes(url, data)
    return True


def remove(url: str, recursive: bool = False) -> None:
    """Delete the file (or, with `recursive`, the folder) at `url`; nothing there is not an error."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def move(source: str, target: str) -> None:
    """Move a file within one storage (on an object store: a copy, then a delete)."""
    fs, src = filesystem(source)
    _, dst = filesystem(target)
    if is_local(target):
        fs.makedirs(_parent(dst), exist_ok=True)
    fs.mv(src, dst)


def list_files(url: str, suffixes: Sequence[str] = (), recursive: bool = False) -> list[str]:
    """The files under the folder `url` (paths on its file system, sorted), hidden names left out
    (they are being written); only those ending in `suffixes` when given. A missing folder: []."""
    fs, root = filesystem(url)
    try:
        if recursive:
            paths = list(fs.find(root))
        else:
            paths = [e["name"] for e in fs.ls(root, detail=True) if e.get("type") == "file"]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p for p in paths if not p.rstrip("/").rsplit("/", 1)[-1].startswith(".")
                  and (not suffixes or p.endswith(tuple(suffixes))))


def url_of(url: str, path: str) -> str:
    """The URL of `path`, a path on the file system of `url` (as `list_files` returns them)."""
    proto = protocol(url)
    return path if proto in _LOCAL else f"{proto}://{path.lstrip('/')}"
