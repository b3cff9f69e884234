"""pipeline/storage.py with protocols other than S3, through fsspec: no Ray, no server.

fsspec's ``memory://`` (installed with fsspec) stands for any protocol the project has no code of
its own for; a protocol whose library is missing must fail in one line naming the package.
"""

import sys
import uuid

import pytest

from pipeline.cluster import check_visible_to_cluster
from pipeline.storage import (Store, StorageError, exists, fsspec_fs, list_files, parse_uri, pyarrow_fs, read_bytes,
                              write_bytes)


@pytest.fixture
def mem():
    """A fresh prefix in fsspec's in-process memory store, removed afterwards."""
    import fsspec
    root = f"memory://mae-tests-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    p = parse_uri(root).path
    if fs.exists(p):
        fs.rm(p, recursive=True)


def test_a_memory_uri_round_trips_through_store_and_helpers(mem):
    u = parse_uri(mem + "/run/")
    assert u.scheme == "memory" and parse_uri(str(u)) == u  # one canonical form, however written
    run = Store(mem + "/run")
    run.write("checkpoint_1/a.json", b"{}")
    run.write("checkpoint_1/b.bin", b"12345")
    run.child("checkpoint_2").write("a.json", b"[]")
    assert run.read("checkpoint_1/b.bin") == b"12345"
    assert run.read_if_exists("checkpoint_1/none") is None
    assert run.exists("checkpoint_1/a.json") and not run.exists("nope")
    assert sorted(run.ls()) == ["checkpoint_1", "checkpoint_2"]
    assert sorted(run.ls("checkpoint_1")) == ["a.json", "b.bin"]
    run.rm(["checkpoint_1/a.json", "checkpoint_1/not-there"])  # a missing name is no error, as on S3
    assert sorted(run.ls("checkpoint_1")) == ["b.bin"]
    with pytest.raises(StorageError, match="not found"):
        run.read("checkpoint_1/a.json")

    # the module-level helpers, and listings whose paths join back onto the URI
    write_bytes(f"{mem}/data/cat/1.jpg", b"x" * 3)
    write_bytes(f"{mem}/data/dog/2.jpg", b"y" * 4)
    assert exists(f"{mem}/data/cat/1.jpg") and read_bytes(f"{mem}/data/dog/2.jpg") == b"yyyy"
    listed = list_files(f"{mem}/data", suffixes=(".jpg",))
    data = parse_uri(f"{mem}/data")
    assert listed == [(data.join("cat/1.jpg").path, 3), (data.join("dog/2.jpg").path, 4)]
    from pipeline.sources import resolve
    info = resolve(f"{mem}/data")  # an ImageFolder: labels from the folder names
    assert info.kind == "images" and info.classes == ["cat", "dog"] and len(info.files) == 2
    fs, p = fsspec_fs(f"{mem}/data")
    assert fs.cat_file(info.files[0]) == b"xxx"


def test_parquet_on_a_memory_uri_reads_the_way_the_data_tasks_read_it(mem):
    """pyarrow_fs wraps the fsspec filesystem (pyarrow has none of its own for memory://): the
    driver's footer reads and a decode task's row-group reads go through it unchanged."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipeline.dataset import _unit_rows, read_units
    from pipeline.sources import resolve
    fs, path = pyarrow_fs(f"{mem}/shards")
    assert isinstance(fs, pafs.PyFileSystem)
    table = pa.table({"key": [f"k{i}" for i in range(10)], "image": [bytes([i]) * 5 for i in range(10)],
                      "label": pa.array(list(range(10)), pa.int32())})
    pq.write_table(table, f"{path}/train-00000.parquet", filesystem=fs, row_group_size=4)
    info = resolve(f"{mem}/shards")
    assert info.kind == "parquet" and info.files == [f"{path}/train-00000.parquet"]
    units = read_units(info, rows_per_unit=4)  # footers, read on the driver
    assert [u["row_groups"] for u in units] == [[0], [1], [2]] and sum(u["rows"] for u in units) == 10
    rows = [r for u in units for part in _unit_rows(fs, info.uri, u, 0, 3, retries=0) for r in part["key"]]
    assert rows == [f"k{i}" for i in range(10)]
    assert pq.read_table(info.files[0], filesystem=fs, columns=["label"])["label"].to_pylist() == list(range(10))
    with pytest.raises(StorageError, match="no images or Parquet shards found"):  # as for an empty S3 prefix
        resolve(f"{mem}/no-such-prefix")


def test_a_memory_uri_is_refused_for_a_ray_job_before_ray_is_asked(mem, monkeypatch):
    """memory:// lives in one process: Ray's tasks and workers (other processes, on one node too)
    cannot see it, whatever the shared-filesystem setting says. Remote URIs and declared shared
    paths pass without asking Ray anything."""
    monkeypatch.setitem(sys.modules, "ray", None)  # any use of Ray would raise ImportError
    for shared in (False, True):
        with pytest.raises(StorageError, match=r"data.source=memory://.*this process's memory") as e:
            check_visible_to_cluster({"data.source": f"{mem}/shards", "run.storage_path": "s3://b/runs"},
                                     shared_fs=shared, setting="run.shared_fs=true")
        assert len(str(e.value).splitlines()) == 1
    check_visible_to_cluster({"data.source": "s3://b/shards", "run.storage_path": "gs://b/runs", "x": ""},
                             shared_fs=False, setting="run.shared_fs=true")
    check_visible_to_cluster({"run.storage_path": "/mnt/nfs/runs"}, shared_fs=True, setting="run.shared_fs=true")


def _without(monkeypatch, module: str, *protocols: str):
    """As if ``module`` were not installed (also when it is, and fsspec has loaded it already)."""
    from fsspec.registry import _registry
    monkeypatch.setitem(sys.modules, module, None)
    for p in protocols:
        monkeypatch.delitem(_registry, p, raising=False)


@pytest.mark.parametrize("uri, module, protocols, extra", [
    ("abfs://container/x", "adlfs", ("abfs", "az", "abfss"), "azure"),
    ("az://container/x", "adlfs", ("abfs", "az", "abfss"), "azure"),
    ("gs://bucket/x", "gcsfs", ("gs", "gcs"), "gcs"),
])
def test_a_protocol_whose_library_is_missing_fails_in_one_line_naming_the_package(monkeypatch, uri, module,
                                                                                  protocols, extra):
    _without(monkeypatch, module, *protocols)
    want = f"{uri}: the {uri.split(':')[0]}:// protocol needs {module}: pip install 'ray-mae[{extra}]'"
    for call in (fsspec_fs, lambda u: Store(u), list_files, read_bytes):
        with pytest.raises(StorageError) as e:
            call(uri)
        assert str(e.value) == want
    if uri.startswith("gs://"):  # Ray Data reads gs:// with pyarrow's own GCS filesystem, without gcsfs
        assert type(pyarrow_fs(uri)[0]).__name__ == "GcsFileSystem"
    else:
        with pytest.raises(StorageError, match=f"needs {module}"):
            pyarrow_fs(uri)


def test_one_line_for_what_no_library_serves():
    with pytest.raises(StorageError, match="unsupported scheme 'nosuchproto'"):
        parse_uri("nosuchproto://bucket/x")
    with pytest.raises(StorageError, match="no path after memory://"):
        parse_uri("memory://")
    with pytest.raises(StorageError, match="no bucket name"):
        parse_uri("gs:///x")
    assert parse_uri("gcs://b/x/") == parse_uri("gs://b/x") and parse_uri("s3a://b/x").scheme == "s3"


def test_the_protocol_extras_exist_and_the_image_installs_them():
    """The packages the one-line errors name are extras of pyproject.toml, and the cluster image
    installs every one of them (a job's gs:// or az:// URI must work on the cluster)."""
    import os
    import re
    import tomllib

    from pipeline.storage import EXTRAS
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    for pkg, extra in EXTRAS.items():
        assert any(re.match(rf"{pkg}\b", req) for req in extras[extra]), (pkg, extra, extras.get(extra))
    with open(os.path.join(root, "infra", "docker", "Dockerfile")) as f:
        dockerfile = f.read()
    installed = set(re.search(r'pip install [^\n]*-e "\.\[([a-z,]+)\]"', dockerfile).group(1).split(","))
    assert set(EXTRAS.values()) <= installed, installed


def test_a_protocol_whose_url_names_its_host_keeps_it_in_every_uri_made_from_it(monkeypatch):
    """sftp://HOST/path, hdfs://NAMENODE:PORT/path: the filesystem connects with what the URL's
    host part says; every URI joined onto the parsed one, and the filesystem made from it, keep it
    (a stand-in protocol here: fsspec's memory store, one per host)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry
    from fsspec.utils import infer_storage_options

    class HostMemory(MemoryFileSystem):
        protocol = "hostmem"
        stores: dict = {}

        def __init__(self, host, **kw):
            super().__init__(**kw)
            self.host = host
            self.store = self.stores.setdefault(host, {})
            self.pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            return "/" + infer_storage_options(path)["path"].strip("/") if "://" in path else \
                "/" + path.strip("/")

        @staticmethod
        def _get_kwargs_from_urls(path):
            return {"host": infer_storage_options(path)["host"]}

    monkeypatch.setitem(_registry, "hostmem", HostMemory)
    u = parse_uri("hostmem://node-a/data/run/")
    assert (u.path, u.prefix, str(u)) == ("/data/run", "hostmem://node-a", "hostmem://node-a/data/run")
    assert parse_uri(str(u)) == u and str(u.join("ckpt", "a.json")) == "hostmem://node-a/data/run/ckpt/a.json"
    run = Store(u)
    assert run.fs.host == "node-a"
    run.child("ckpt").write("a.json", b"{}")  # a Store made from a joined URI: the same host
    write_bytes("hostmem://node-b/data/run/ckpt/a.json", b"other host")
    assert read_bytes(str(u.join("ckpt/a.json"))) == b"{}" and fsspec_fs("hostmem://node-b/x")[0].host == "node-b"
    assert list_files(u) == [("/data/run/ckpt/a.json", 2)]
    assert fsspec.filesystem("hostmem", host="node-b").cat_file("/data/run/ckpt/a.json") == b"other host"


def test_an_account_in_the_host_part_is_refused_in_one_line_saying_what_to_write(monkeypatch):
    """adlfs takes abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/path, whose path does not keep the
    account: refused, naming the form that works (a stand-in protocol with adlfs's URL handling)."""
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry
    from fsspec.utils import infer_storage_options

    class AccountMemory(MemoryFileSystem):
        protocol = "acctmem"

        @classmethod
        def _strip_protocol(cls, path):
            ops = infer_storage_options(path)
            return ((ops.get("username") or ops.get("host", "")) + ops["path"]).lstrip("/")

        @staticmethod
        def _get_kwargs_from_urls(path):
            host = infer_storage_options(path).get("host", "")
            return {"account_name": host.split(".")[0]} if host.endswith(".core.windows.net") else {}

    monkeypatch.setitem(_registry, "acctmem", AccountMemory)
    with pytest.raises(StorageError) as e:
        parse_uri("acctmem://container@acct.dfs.core.windows.net/shards")
    assert str(e.value) == ("acctmem://container@acct.dfs.core.windows.net/shards: this form of acctmem:// URI "
                            "is not supported: set AZURE_STORAGE_ACCOUNT_NAME and write acctmem://CONTAINER/prefix")
    assert parse_uri("acctmem://container/shards") == parse_uri("acctmem://container/shards/")
