"""URIs -> filesystems: pyarrow's for Ray Data, fsspec's for everything else.

Every input and output of the project is a URI: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``az://container/prefix``, any other protocol fsspec knows whose library is installed,
``file:///abs/path`` or a plain local path. S3 (s3fs, a dependency) and local paths always work;
``gs://`` needs gcsfs (``pip install 'ray-mae[gcs]'``), ``az://``/``abfs://`` adlfs
(``'ray-mae[azure]'``): a URI whose library is missing fails in one line naming the package.
pyarrow's own filesystems serve s3, gs and local paths to Ray Data; for any other protocol the
fsspec filesystem is wrapped (``PyFileSystem(FSSpecHandler(fs))``).

S3-compatible endpoints come from the standard ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
variables (or ``endpoint_url=``); credentials come from the standard chain only (environment,
shared config, instance role; for Azure adlfs's ``AZURE_STORAGE_*`` variables) and are never
printed, logged or written: error messages go through :func:`redact`.

``memory://`` (fsspec's in-process store) works for everything that runs in one process, and is
refused for a Ray job by :func:`check_visible_to_cluster`: Ray's tasks and workers are other
processes, even on one node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
              "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_TOKEN",
              "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
              "AZURE_STORAGE_CLIENT_SECRET", "AZURE_CLIENT_SECRET",
              "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY")

# Protocols with their own handling; any other one fsspec knows goes through fsspec generically.
ALIASES = {"s3a": "s3", "gcs": "gs", "local": "file"}
# The package a protocol's fsspec library comes in, when it is an extra of this project.
EXTRAS = {"gcsfs": "gcs", "adlfs": "azure"}
# Options of fsspec filesystems that take them: no listings cache (see _s3_options).
FS_OPTIONS = {"gs": {"use_listings_cache": False}, "az": {"use_listings_cache": False},
              "abfs": {"use_listings_cache": False}, "abfss": {"use_listings_cache": False}}
# Where a URI's data lives when it is not on shared storage: on this node (local paths) or in this
# process only (fsspec's memory://, which no Ray task or worker can see, even on one node).
NODE_LOCAL = ("file",)
PROCESS_LOCAL = ("memory",)


class StorageError(RuntimeError):
    """One clear line naming the URI and what to check."""


@dataclass(frozen=True)
class URI:
    scheme: str  # "file", "s3", "gs", or another fsspec protocol ("az", "memory", ...)
    path: str    # what the protocol's filesystem takes: bucket/key, an absolute path for files
    # For a protocol whose URL carries what its filesystem connects with (sftp://HOST/path,
    # hdfs://NAMENODE:PORT/path): the URL before the path; "" for the others.
    prefix: str = ""

    def __str__(self) -> str:
        if self.prefix:
            return self.prefix + ("" if self.path.startswith("/") else "/") + self.path
        if self.scheme == "file" or "://" in self.path:  # (fsspec's http keeps the whole URL as path)
            return self.path
        return f"{self.scheme}://{self.path}"

    @property
    def bucket(self) -> str:
        return self.path.lstrip("/").split("/", 1)[0]

    def join(self, *parts: str) -> "URI":
        p = self.path.rstrip("/")
        for part in parts:
            p = f"{p}/{part.strip('/')}"
        return dataclasses.replace(self, path=p)

    def parent(self) -> "URI":
        return dataclasses.replace(self, path=self.path.rstrip("/").rsplit("/", 1)[0])


def parse_uri(uri: str | os.PathLike) -> URI:
    s = os.fspath(uri)
    if not s:
        raise StorageError("empty URI: give s3://bucket/prefix, gs://bucket/prefix or a local path")
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", s)
    if not m:
        return URI("file", os.path.abspath(os.path.expanduser(s)))
    scheme, rest = m.group(1).lower(), m.group(2)
    scheme = ALIASES.get(scheme, scheme)
    if scheme in ("s3", "gs"):
        if not rest or rest.startswith("/"):
            raise StorageError(f"{s}: no bucket name: write {scheme}://BUCKET/prefix")
        return URI(scheme, rest.rstrip("/") if rest.count("/") else rest)
    if scheme == "file":
        return URI("file", os.path.abspath(rest))
    # Any other protocol fsspec knows: its filesystem's own form of the path (what its listings
    # return, e.g. "/bucket/key" for memory://), so that listed paths and joined ones agree.
    cls = _fs_class(scheme, s)
    url = f"{scheme}://{rest}"
    path = cls._strip_protocol(url)
    if not path.strip("/"):
        raise StorageError(f"{s}: no path after {scheme}://: write {scheme}://BUCKET/prefix")
    path = path.rstrip("/")
    prefix = ""
    options = cls._get_kwargs_from_urls(url)
    if options:  # the URL carries what the filesystem connects with (a host, an account)
        bare = url.rstrip("/")
        head = bare[:len(bare) - len(path)]
        if not bare.endswith(path) or "://" not in head:
            hint = (f"set AZURE_STORAGE_ACCOUNT_NAME and write {scheme}://CONTAINER/prefix"
                    if "account_name" in options else f"write {scheme}://HOST/path")
            raise StorageError(f"{s}: this form of {scheme}:// URI is not supported: {hint}")
        prefix = head.rstrip("/")  # kept, so that every URI joined onto this one connects the same way
    return URI(scheme, path, prefix)


def _fs_class(scheme: str, uri: str):
    """The fsspec filesystem class of a protocol; one line when fsspec does not know the protocol
    or its library is not installed (naming the package to install)."""
    import fsspec
    from fsspec.registry import known_implementations, registry
    if scheme not in registry and scheme not in known_implementations:
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}: use s3://, gs://, az://, another "
                           "protocol fsspec knows, file:// or a local path")
    try:
        return fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        spec = known_implementations.get(scheme, {})
        pkg = spec.get("class", scheme).split(".", 1)[0]
        how = f"pip install 'ray-mae[{EXTRAS[pkg]}]'" if pkg in EXTRAS else f"pip install {pkg}"
        cause = e.__cause__ or e
        missing = getattr(cause, "name", None)
        why = f" (missing module {missing})" if missing and missing.split(".")[0] != pkg else ""
        raise StorageError(f"{uri}: the {scheme}:// protocol needs {pkg}: {how}{why}") from None


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
S3_ATTEMPTS = 8
"""Attempts per S3 request, for pyarrow's client and s3fs' alike: a throttled store (503 SlowDown)
sheds a share of requests for minutes, and 3 attempts (both clients' default) lose a write in a
thousand at 10% refused."""


@lru_cache(maxsize=8)
def _pa_s3(endpoint: str | None):
    return _pa_s3_class()(endpoint)


@lru_cache(maxsize=1)
def _pa_s3_class():
    """pyarrow's S3FileSystem that keeps its retry strategy when pickled. pyarrow's own pickles
    without it, so the copy a Ray Data task, the Train controller or a worker gets retries 3 times,
    not :data:`S3_ATTEMPTS` (the controller's run-state writes then fail a run under throttling).
    Pickled as its endpoint: credentials stay out of the pickle and come from the process's own
    environment, as with pyarrow's."""
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        def __init__(self, endpoint: str | None):
            kw = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)}
            if endpoint:
                # pyarrow ignores AWS_ENDPOINT_URL when built with no arguments: pass it explicitly.
                scheme, _, host = endpoint.partition("://")
                kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https",
                          region=_region())
            super().__init__(**kw)
            self._endpoint = endpoint

        def __reduce__(self):
            return _pa_s3, (self._endpoint,)

    return RetryingS3FileSystem


def pyarrow_fs(uri: str | URI, endpoint: str | None = None):
    """-> (pyarrow.fs.FileSystem, path) for Ray Data readers and writers: pyarrow's own for s3,
    gs and local paths, the protocol's fsspec filesystem wrapped for any other."""
    u = uri if isinstance(uri, URI) else parse_uri(uri)
    import pyarrow.fs as pafs
    if u.scheme == "s3":
        return _pa_s3(endpoint_url(endpoint)), u.path
    if u.scheme == "gs":
        return pafs.GcsFileSystem(), u.path
    if u.scheme == "file":
        return pafs.LocalFileSystem(), u.path
    fs, path = fsspec_fs(u)
    from fsspec.implementations.arrow import ArrowFSWrapper
    if isinstance(fs, ArrowFSWrapper):  # fsspec's wrapper of a pyarrow filesystem (hdfs): the inner one
        return fs.fs, path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# ---------------------------------------------------------------------------- fsspec
def _s3_options(endpoint: str | None) -> dict:
    """The one set of s3fs options (also handed to torch's DCP reader by :func:`fsspec_options`).

    No listings cache: several processes write the same run directory (ranks, restarted attempts,
    the tune driver), and s3fs answers exists()/size() (and so cat_file()) from a cached listing
    when it has one, which makes a file written after that listing "not found"."""
    kw = {"config_kwargs": {"retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"}}, "use_listings_cache": False}
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
    import fsspec
    if u.scheme == "file":
        return fsspec.filesystem("file", auto_mkdir=True), u.path
    cls = _fs_class(u.scheme, str(u))  # one line naming the package when its library is missing
    options = {**(cls._get_kwargs_from_urls(str(u)) if u.prefix else {}), **FS_OPTIONS.get(u.scheme, {})}
    with storage_errors(u):  # a library that cannot start (no account, no credentials): one line too
        return cls(**options), u.path  # (fsspec caches instances by their options)


# ---------------------------------------------------------------------------- errors
def explain(uri: str | URI, exc: BaseException) -> str:
    """One line: the URI, what went wrong, what to check."""
    u = str(uri)
    msg = redact(f"{type(exc).__name__}: {exc}").splitlines()[0][:300] if str(exc) else type(exc).__name__
    low = msg.lower()
    aws = "://" not in u or u.startswith(("s3://", "s3a://"))  # (local paths: as before)
    ep = endpoint_url() or "the default AWS endpoint"
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket does not exist" in low:
        return f"{u}: the bucket does not exist: create it or fix the bucket name"
    if isinstance(exc, PermissionError) or any(s in low for s in ("accessdenied", "access denied", "forbidden",
                                                                  "invalidaccesskeyid", "signaturedoesnotmatch")):
        if not aws:
            return f"{u}: access denied: check the credentials {u.split('://', 1)[0]}:// uses and the bucket's policy"
        return (f"{u}: access denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE or the node's role) and the bucket policy")
    if any(s in low for s in ("could not connect", "connection refused", "connect timeout", "endpointconnection",
                              "failed to connect", "curlcode: 7", "couldn't connect", "name or service not known",
                              "temporary failure in name resolution")):
        if not aws:
            return f"{u}: cannot reach the storage service: check the network"
        return f"{u}: cannot reach the storage endpoint {ep}: check AWS_ENDPOINT_URL and the network"
    if isinstance(exc, FileNotFoundError) or "nosuchkey" in low or "not found" in low or "does not exist" in low:
        return f"{u}: not found: check the path (and that the prefix holds data)"
    if not aws:
        return f"{u}: storage error ({msg}); check the URI and the credentials"
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
    return dict(FS_OPTIONS.get(u.scheme, {}))


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
        """Delete these objects, those that exist (one bulk request on S3)."""
        if self.uri.scheme == "file":  # the local filesystem refuses to delete what is not there
            names = [n for n in names if os.path.exists(self.key(n))]
        if not names:
            return
        with storage_errors(self.uri_of(names[0])):
            try:
                self.fs.rm([self.key(n) for n in names])
            except FileNotFoundError:  # fsspec's other filesystems (memory://) refuse a missing name
                if self.uri.scheme == "s3":
                    raise
                there = [self.key(n) for n in names if self.fs.exists(self.key(n))]
                if there:
                    self.fs.rm(there)
