"""URIs -> filesystems: pyarrow's for Ray Data, fsspec's (s3fs) for everything else.

Every input and output of the project is a URI: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///abs/path`` or a plain local path. S3-compatible endpoints come from the standard
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` variables (or ``endpoint_url=``); credentials come
from the standard chain only (environment, shared config, instance role) and are never printed,
logged or written: error messages go through :func:`redact`.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
              "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_TOKEN")


class StorageError(RuntimeError):
    """One clear line naming the URI and what to check."""


@dataclass(frozen=True)
class URI:
    scheme: str  # "s3", "gs" or "file"
    path: str    # bucket/key for object stores; an absolute path for files

    def __str__(self) -> str:
        return self.path if self.scheme == "file" else f"{self.scheme}://{self.path}"

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def join(self, *parts: str) -> "URI":
        p = self.path.rstrip("/")
        for part in parts:
            p = f"{p}/{part.strip('/')}"
        return URI(self.scheme, p)


def parse_uri(uri: str | os.PathLike) -> URI:
    s = os.fspath(uri)
    if not s:
        raise StorageError("empty URI: give s3://bucket/prefix, gs://bucket/prefix or a local path")
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", s)
    if not m:
        return URI("file", os.path.abspath(os.path.expanduser(s)))
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme in ("s3", "s3a"):
        if not rest or rest.startswith("/"):
            raise StorageError(f"{s}: no bucket name: write s3://BUCKET/prefix")
        return URI("s3", rest.rstrip("/") if rest.count("/") else rest)
    if scheme in ("gs", "gcs"):
        if not rest or rest.startswith("/"):
            raise StorageError(f"{s}: no bucket name: write gs://BUCKET/prefix")
        return URI("gs", rest)
    if scheme == "file":
        return URI("file", os.path.abspath(rest))
    raise StorageError(f"{s}: unsupported scheme {scheme!r}: use s3://, gs://, file:// or a local path")


def redact(text: str) -> str:
    """Remove the values of credential variables from a message."""
    for k in SECRET_ENV:
        v = os.environ.get(k)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    return text


def endpoint_url(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


# ---------------------------------------------------------------------------- pyarrow
@lru_cache(maxsize=8)
def _pa_s3(endpoint: str | None):
    import pyarrow.fs as pafs
    kw = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8)}
    if endpoint:
        # pyarrow ignores AWS_ENDPOINT_URL when built with no arguments: pass it explicitly.
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https",
                  region=_region())
    return pafs.S3FileSystem(**kw)


def pyarrow_fs(uri: str | URI, endpoint: str | None = None):
    """-> (pyarrow.fs.FileSystem, path) for Ray Data readers and writers."""
    u = uri if isinstance(uri, URI) else parse_uri(uri)
    import pyarrow.fs as pafs
    if u.scheme == "s3":
        return _pa_s3(endpoint_url(endpoint)), u.path
    if u.scheme == "gs":
        return pafs.GcsFileSystem(), u.path
    return pafs.LocalFileSystem(), u.path


# ---------------------------------------------------------------------------- fsspec
def _s3_options(endpoint: str | None) -> dict:
    """The one set of s3fs options (also handed to torch's DCP reader by :func:`fsspec_options`).

    No listings cache: several processes write the same run directory (ranks, restarted attempts,
    the tune driver), and s3fs answers exists()/size() (and so cat_file()) from a cached listing
    when it has one, which makes a file written after that listing "not found"."""
    kw = {"config_kwargs": {"retries": {"max_attempts": 8, "mode": "standard"}}, "use_listings_cache": False}
    if endpoint:
        kw.update(endpoint_url=endpoint, client_kwargs={"region_name": _region()})
    return kw


@lru_cache(maxsize=8)
def _fs_s3(endpoint: str | None):
    import s3fs
    return s3fs.S3FileSystem(**_s3_options(endpoint))


def fsspec_fs(uri: str | URI, endpoint: str | None = None):
    """-> (fsspec.AbstractFileSystem, path) for listing, small files, checkpoints."""
    u = uri if isinstance(uri, URI) else parse_uri(uri)
    if u.scheme == "s3":
        return _fs_s3(endpoint_url(endpoint)), u.path
    if u.scheme == "gs":
        try:
            import gcsfs
        except ImportError as e:
            raise StorageError(f"{u}: gs:// needs the gcsfs package: pip install gcsfs") from e
        return gcsfs.GCSFileSystem(use_listings_cache=False), u.path  # see _fs_s3
    import fsspec
    return fsspec.filesystem("file", auto_mkdir=True), u.path


# ---------------------------------------------------------------------------- errors
def explain(uri: str | URI, exc: BaseException) -> str:
    """One line: the URI, what went wrong, what to check."""
    u = str(uri)
    msg = redact(f"{type(exc).__name__}: {exc}").splitlines()[0][:300] if str(exc) else type(exc).__name__
    low = msg.lower()
    ep = endpoint_url() or "the default AWS endpoint"
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket does not exist" in low:
        return f"{u}: the bucket does not exist: create it or fix the bucket name"
    if isinstance(exc, PermissionError) or any(s in low for s in ("accessdenied", "access denied", "forbidden",
                                                                  "invalidaccesskeyid", "signaturedoesnotmatch")):
        return (f"{u}: access denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or the node's role) and the bucket policy")
    if any(s in low for s in ("could not connect", "connection refused", "connect timeout", "endpointconnection",
                              "failed to connect", "curlcode: 7", "couldn't connect", "name or service not known",
                              "temporary failure in name resolution")):
        return f"{u}: cannot reach the storage endpoint {ep}: check AWS_ENDPOINT_URL and the network"
    if isinstance(exc, FileNotFoundError) or "nosuchkey" in low or "not found" in low or "does not exist" in low:
        return f"{u}: not found: check the path (and that the prefix holds data)"
    return f"{u}: storage error ({msg}); check the URI, the endpoint ({ep}) and the credentials"


@contextlib.contextmanager
def storage_errors(uri: str | URI) -> Iterator[None]:
    """Turn any storage exception into a one-line :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - translated, never swallowed
        raise StorageError(explain(uri, e)) from None


# ---------------------------------------------------------------------------- cluster
def check_visible_to_cluster(paths: dict[str, str], *, shared_fs: bool, setting: str) -> None:
    """Refuse a local path that the tasks and workers of a multi-node Ray cluster cannot see.

    ``paths``: {name the user knows it by: path}. On one node a local path is fine (the demo); on
    several, a checkpoint written or a file read on another node fails (or a listing made on the
    driver names files that node does not have), unless every node mounts the same filesystem,
    which the user declares with ``setting``."""
    local = {k: v for k, v in paths.items() if v and parse_uri(v).scheme == "file"}
    if shared_fs or not local:
        return
    import ray
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    scales = autoscaler_limits() is not None  # a cluster that adds nodes has several, if not yet
    if nodes <= 1 and not scales:
        return
    name, value = next(iter(local.items()))
    has = f"{nodes} nodes" if nodes > 1 else "an autoscaler that adds nodes"
    raise StorageError(f"{name}={value} is a local path, but the Ray cluster has {has} and the others "
                       "cannot see it: use an s3:// or gs:// URI, or, if every node mounts that path (NFS, "
                       f"Lustre, FSx), say so with {setting}")


def autoscaler_limits() -> dict | None:
    """The most of each resource the cluster's autoscaler may bring up (None: a fixed cluster)."""
    try:
        from ray._private.state import state  # what Ray Data's own limits read; no public API yet
        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # noqa: BLE001 - an older/newer Ray without it: treat as fixed
        return None


def with_retries(fn, *, retries: int = 4, first_delay_s: float = 0.5):
    """``fn()``, run again with exponential backoff (jittered) when it raises a StorageError: a
    throttled, reset or momentarily denied read outlasts the client's own quick retries. Raised
    after ``retries`` more tries, with the count in the message."""
    import random
    import time
    for attempt in range(retries + 1):
        try:
            return fn()
        except StorageError as e:
            if attempt == retries:
                raise StorageError(f"{e} (after {retries} retries)") from None
            time.sleep(first_delay_s * 2**attempt * (0.5 + random.random()))


# ---------------------------------------------------------------------------- helpers
def exists(uri: str | URI) -> bool:
    fs, p = fsspec_fs(uri)
    with storage_errors(uri):
        return fs.exists(p)


def list_files(uri: str | URI, suffixes: tuple[str, ...] | None = None) -> list[tuple[str, int]]:
    """Recursive listing: sorted [(path, size)] under the URI (object-store paths without scheme)."""
    u = uri if isinstance(uri, URI) else parse_uri(uri)
    fs, p = fsspec_fs(u)
    with storage_errors(u):
        if u.scheme != "file" and "/" not in p.strip("/"):
            fs.ls(p)  # a bare bucket: surfaces NoSuchBucket instead of an empty listing
        found = fs.find(p, detail=True)
    out = []
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        if suffixes and not path.lower().endswith(suffixes):
            continue
        out.append((path, int(info.get("size") or 0)))
    out.sort()
    return out


def read_bytes(uri: str | URI) -> bytes:
    fs, p = fsspec_fs(uri)
    with storage_errors(uri):
        return fs.cat_file(p)


def write_bytes(uri: str | URI, data: bytes) -> None:
    u = uri if isinstance(uri, URI) else parse_uri(uri)
    fs, p = fsspec_fs(u)
    with storage_errors(u):
        if u.scheme == "file":
            os.makedirs(os.path.dirname(p), exist_ok=True)
        fs.pipe_file(p, data)


def to_uri_string(scheme: str, path: str) -> str:
    return path if scheme == "file" else f"{scheme}://{path}"


# ---------------------------------------------------------------------------- a directory, once
def fsspec_options(uri: str | URI, endpoint: str | None = None) -> dict:
    """Storage options that make ``fsspec.url_to_fs(str(uri), **options)`` the same filesystem as
    :func:`fsspec_fs` (for torch's DCP ``FsspecReader``, which builds its own)."""
    u = uri if isinstance(uri, URI) else parse_uri(uri)
    if u.scheme == "s3":
        return _s3_options(endpoint_url(endpoint))
    if u.scheme == "gs":
        return {"use_listings_cache": False}
    return {}


class Store:
    """A directory on storage resolved once (URI, fsspec filesystem, path) and handed down, so
    that helpers do not re-parse the same URI string. Every call raises a one-line
    :class:`StorageError` naming the object."""

    def __init__(self, uri: str | URI, *, _fs=None):
        self.uri = uri if isinstance(uri, URI) else parse_uri(uri)
        self.fs, self.path = (_fs, self.uri.path) if _fs is not None else fsspec_fs(self.uri)
        self.path = self.path.rstrip("/")

    def __str__(self) -> str:
        return str(self.uri)

    def __repr__(self) -> str:
        return f"Store({str(self.uri)!r})"

    def child(self, *parts: str) -> "Store":
        return Store(self.uri.join(*parts), _fs=self.fs)

    def key(self, name: str = "") -> str:
        return f"{self.path}/{name.strip('/')}" if name else self.path

    def uri_of(self, name: str = "") -> str:
        return str(self.uri.join(name)) if name else str(self.uri)

    def read(self, name: str) -> bytes:
        with storage_errors(self.uri_of(name)):
            return self.fs.cat_file(self.key(name))

    def read_if_exists(self, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist; any other error raises."""
        try:
            return self.read(name)
        except StorageError as e:
            if "not found" in str(e):
                return None
            raise

    def write(self, name: str, data: bytes) -> None:
        with storage_errors(self.uri_of(name)):
            if self.uri.scheme == "file":
                os.makedirs(os.path.dirname(self.key(name)), exist_ok=True)
            self.fs.pipe_file(self.key(name), data)

    def exists(self, name: str = "") -> bool:
        with storage_errors(self.uri_of(name)):
            return self.fs.exists(self.key(name))

    def put(self, local_path: str, name: str) -> None:
        with storage_errors(self.uri_of(name)):
            if self.uri.scheme == "file":
                os.makedirs(os.path.dirname(self.key(name)), exist_ok=True)
            self.fs.put_file(local_path, self.key(name))

    def get(self, name: str, local_path: str) -> None:
        with storage_errors(self.uri_of(name)):
            self.fs.get_file(self.key(name), local_path)

    def ls(self, name: str = "") -> list[str]:
        """Names directly under ``name`` (one listing request)."""
        with storage_errors(self.uri_of(name)):
            return [e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.key(name), detail=False)]

    def rm(self, names: list[str]) -> None:
        """Delete these objects, those that exist (one bulk request on object stores)."""
        if self.uri.scheme == "file":  # the local filesystem refuses to delete what is not there
            names = [n for n in names if os.path.exists(self.key(n))]
        if not names:
            return
        with storage_errors(self.uri_of(names[0])):
            self.fs.rm([self.key(n) for n in names])
