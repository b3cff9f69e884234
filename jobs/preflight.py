"""mae preflight [CONFIG.yaml] [overrides]: check the cluster a run would use, before it holds a GPU.

One table, a verdict per line (OK, WARN, FAIL; the command exits 1 on any FAIL):

- the nodes, and how many training workers each can hold for ``scaling`` (CPUs, GPUs and any
  ``resources_per_worker``, per node, not only in total), and the CPUs left for the decode tasks;
- the storage URIs, from every node that touches them: ``data.source`` read and
  ``run.storage_path`` written, read back and deleted, by a task on each node;
- token authentication on the cluster's dashboard (the job server every submission goes through);
- a short all-reduce between two nodes (torch.distributed: NCCL with GPUs, else gloo) and its
  measured bus bandwidth: a multi-node run over plain TCP where the instances have a fabric (EFA,
  InfiniBand) shows up here as a low figure.

``mae pretrain`` and ``mae tune`` run the placement part (no task, no network) at launch.

    mae preflight jobs/configs/mae_vit_base_imagenet.yaml data.source=s3://b/shards \\
        run.storage_path=s3://b/runs scaling.num_workers=64 scaling.use_gpu=true
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.core.common import UserError, init_ray, one_line_errors, parse_config_command
from jobs.core.config import PretrainConfig, load
from jobs.core.placement import FAIL, OK, WARN, Row, alive_nodes, node_label, placement_rows

# ---------------------------------------------------------------------------- storage, per node
def _probe_storage(source: str, source_file: str | None, storage: str, tag: str) -> list[tuple[str, str, str]]:
    """Runs on one node: -> [(check, detail, verdict)] for reading one file of the source (a path on
    the source's filesystem) and writing storage."""
    from pipeline.storage import Store, fsspec_fs, parse_uri
    out = []
    if source_file:
        t0 = time.perf_counter()
        try:
            fs, _ = fsspec_fs(source)
            with fs.open(source_file, "rb") as f:
                n = len(f.read(4096))
            out.append(("read data.source", f"{n} bytes of {source_file} in {1e3 * (time.perf_counter() - t0):.0f} ms",
                        OK))
        except Exception as e:  # noqa: BLE001 - reported as the row's verdict
            out.append(("read data.source", f"{type(e).__name__}: {e}".splitlines()[0][:300], FAIL))
    t0 = time.perf_counter()
    probe = Store(str(parse_uri(storage).join(".mae-preflight")))
    name = f"{tag}-{time.time_ns()}"
    try:
        data = b"mae preflight " + name.encode()
        probe.write(name, data)
        back = probe.read(name)
        probe.rm([name])
        ok = back == data
        out.append(("write run.storage_path", f"write, read back, delete in {1e3 * (time.perf_counter() - t0):.0f} ms"
                    + ("" if ok else ": read back other bytes"), OK if ok else FAIL))
    except Exception as e:  # noqa: BLE001
        out.append(("write run.storage_path", f"{type(e).__name__}: {e}".splitlines()[0][:300], FAIL))
    return out


def storage_rows(cfg: PretrainConfig, nodes: list[dict], timeout_s: float = 120.0) -> list[Row]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.sources import resolve
    from pipeline.cluster import check_visible_to_cluster
    from jobs.core.launch import paths_of
    try:
        check_visible_to_cluster(paths_of(cfg), shared_fs=cfg.run.shared_fs, setting="run.shared_fs=true")
    except UserError as e:
        return [Row("paths", "cluster", str(e), FAIL)]
    try:
        info = resolve(cfg.data.source, cfg.data.split, cfg.data.val_fraction, cfg.data.seed)
        first = info.files[0] if info.files else None
    except Exception as e:  # noqa: BLE001
        return [Row("read data.source", "driver", f"{type(e).__name__}: {e}".splitlines()[0][:300], FAIL)]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_storage)
    refs = {node_label(n): probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(info.uri, first, cfg.run.storage_path, n["NodeID"][:8]) for n in nodes}
    rows = []
    for where, ref in refs.items():
        try:
            for check, detail, verdict in ray.get(ref, timeout=timeout_s):
                rows.append(Row(check, where, detail, verdict))
        except Exception as e:  # noqa: BLE001 - a node that cannot run the probe
            rows.append(Row("storage", where, f"the probe task failed: {type(e).__name__}", FAIL))
    return rows


# ---------------------------------------------------------------------------- auth
def auth_row(dashboard: str | None = None) -> Row:
    """Whether the cluster's dashboard (its job server) refuses a request without a token."""
    import os
    import urllib.error
    import urllib.request
    url = dashboard or (os.environ.get("RAY_ADDRESS", "") if os.environ.get("RAY_ADDRESS", "").startswith("http")
                        else None)
    if not url:
        try:
            from ray.job_submission import JobSubmissionClient
            url = JobSubmissionClient().get_address()
        except Exception:  # noqa: BLE001
            return Row("token auth", "dashboard", "dashboard not found: not checked", WARN)
    url = url if url.startswith("http") else f"http://{url}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/version", timeout=10) as r:
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except Exception as e:  # noqa: BLE001
        return Row("token auth", url, f"dashboard unreachable ({type(e).__name__})", WARN)
    if code in (401, 403):
        return Row("token auth", url, "requests without the token are refused", OK)
    return Row("token auth", url, f"answers without a token (HTTP {code}): anyone who reaches this port can run "
               "code on the cluster; start Ray with RAY_AUTH_MODE=token", WARN)


# ---------------------------------------------------------------------------- all-reduce
class _Peer:
    """One end of the two-node all-reduce (a Ray actor)."""

    def addr(self) -> tuple[str, int]:
        import socket

        import ray
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def run(self, master: tuple[str, int], rank: int, mb: int, iters: int, use_gpu: bool) -> dict:
        import datetime

        import torch
        import torch.distributed as dist
        backend = "nccl" if use_gpu else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=120))
        try:
            dev = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
            x = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=dev)
            dist.all_reduce(x)  # warm-up: connections, buffers
            if use_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(x)
            if use_gpu:
                torch.cuda.synchronize()
            return {"s": time.perf_counter() - t0, "backend": backend, "ok": bool(x[0].item() == 2.0 ** (iters + 1))}
        finally:
            dist.destroy_process_group()


def allreduce_row(cfg: PretrainConfig, nodes: list[dict], mb: int = 64, iters: int = 5,
                  timeout_s: float = 300.0) -> Row:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    gpu = cfg.scaling.use_gpu
    pair = [n for n in nodes if n["Resources"].get("GPU", 0) >= 1] if gpu else list(nodes)
    if len(pair) < 2:
        return Row("all-reduce", "cluster", f"fewer than two {'GPU ' if gpu else ''}nodes: nothing to measure", WARN)
    a, b = pair[0], pair[1]
    peer = ray.remote(num_cpus=0, num_gpus=1 if gpu else 0)(_Peer)
    ends = [peer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in (a, b)]
    where = f"{node_label(a)} <-> {node_label(b)}"
    try:
        master = ray.get(ends[0].addr.remote(), timeout=timeout_s)
        res = ray.get([e.run.remote(master, r, mb, iters, gpu) for r, e in enumerate(ends)], timeout=timeout_s)
    except Exception as e:  # noqa: BLE001
        return Row("all-reduce", where, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", FAIL)
    finally:
        for e in ends:
            ray.kill(e)
    s = max(r["s"] for r in res)
    busbw = mb * 2**20 * iters / s / 1e9  # ring all-reduce over 2 ranks: bus bandwidth = algorithm bandwidth
    if not all(r["ok"] for r in res):
        return Row("all-reduce", where, "wrong sum: the two ends did not reduce together", FAIL)
    verdict = OK
    detail = f"{iters} x {mb} MiB ({res[0]['backend']}): {busbw:.2f} GB/s bus bandwidth"
    if gpu and busbw < 10:  # 100 Gb/s TCP gives ~5-10; EFA / InfiniBand 25-400
        verdict = WARN
        detail += ": no fabric in use? run with NCCL_DEBUG=INFO and look for 'NET/OFI' or 'NET/IB' (docs/scaling.md)"
    return Row("all-reduce", where, detail, verdict)


# ---------------------------------------------------------------------------- the table
def run_preflight(cfg: PretrainConfig, *, allreduce_mb: int = 64, network: bool = True,
                  dashboard: str | None = None) -> list[Row]:
    nodes = alive_nodes()
    rows = placement_rows(cfg, nodes)
    rows += storage_rows(cfg, nodes)
    rows.append(auth_row(dashboard))
    if network:
        rows.append(allreduce_row(cfg, nodes, mb=allreduce_mb))
    return rows


def table(rows: list[Row]) -> str:
    cols = [("check", 22), ("where", 34), ("verdict", 7)]
    out = [" ".join(f"{c:<{w}}" for c, w in cols) + " detail"]
    for r in rows:
        out.append(f"{r.check:<22} {r.where:<34} {r.verdict:<7} {r.detail}")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mae preflight", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="the run's YAML config (as for mae pretrain)")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides")
    ap.add_argument("--allreduce-mb", type=int, default=64, help="size of the all-reduce buffer (MiB)")
    ap.add_argument("--no-network", action="store_true", help="skip the all-reduce between two nodes")
    return ap


def parse(argv: list[str], *, strict: bool = False) -> argparse.Namespace:
    return parse_config_command("mae preflight", parser(), argv, strict=strict)


def check(argv: list[str]) -> str | None:
    """What ``mae submit`` checks locally: the arguments and the config. -> the config file named."""
    a = parse(argv, strict=True)
    load(a.config, a.overrides)
    return a.config


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with one_line_errors("mae preflight"):
        a = parse(argv)
        cfg = load(a.config, a.overrides)
        init_ray(cfg.run.address or None)
        rows = run_preflight(cfg, allreduce_mb=a.allreduce_mb, network=not a.no_network)
    print(table(rows))
    failed = [r for r in rows if r.verdict == FAIL]
    print(f"[preflight] {len(rows)} checks: {len(failed)} failed, "
          f"{sum(r.verdict == WARN for r in rows)} warnings", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
