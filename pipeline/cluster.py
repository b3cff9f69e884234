"""What a Ray cluster can see: local paths refused where other nodes cannot read them, and the
resources an autoscaling cluster may bring up."""

from __future__ import annotations

from .storage import NODE_LOCAL, PROCESS_LOCAL, StorageError, parse_uri


def check_visible_to_cluster(paths: dict[str, str], *, shared_fs: bool, setting: str) -> None:
    """Refuse a local path that the tasks and workers of a multi-node Ray cluster cannot see.

    ``paths``: {name the user knows it by: path}. On one node a local path is fine (the demo); on
    several, a checkpoint written or a file read on another node fails (or a listing made on the
    driver names files that node does not have), unless every node mounts the same filesystem,
    which the user declares with ``setting``. A ``memory://`` URI lives in this process only: no
    Ray task or worker sees it, on any cluster (one node too), whatever ``setting`` says; refused
    before Ray is asked anything."""
    schemes = {k: parse_uri(v).scheme for k, v in paths.items() if v}
    for k, scheme in schemes.items():
        if scheme in PROCESS_LOCAL:
            raise StorageError(f"{k}={paths[k]} lives in this process's memory ({scheme}://): Ray's tasks and "
                               "workers are other processes and cannot see it, on one node too: use an "
                               "object-store URI (s3://, gs://, az://) or a local path")
    local = {k: paths[k] for k, scheme in schemes.items() if scheme in NODE_LOCAL}
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
                       "cannot see it: use an object-store URI (s3://, gs://, az://), or, if every node mounts "
                       f"that path (NFS, Lustre, FSx), say so with {setting}")


def autoscaler_limits() -> dict | None:
    """The most of each resource the cluster's autoscaler may bring up (None: a fixed cluster)."""
    from .private_api import autoscaler_max_resources  # what Ray Data's own limits read; no public API yet
    return autoscaler_max_resources()
