"""Where a run's training workers go: how many each node holds for ``scaling``, per node (8
workers of one GPU do not fit on two nodes of 4 GPUs and one of none, 8 GPUs in all), and the CPUs
left beside them for the decode tasks. Checked at launch (no task, no network) and by
``mae preflight``."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.core.common import UserError
from jobs.core.config import PretrainConfig
from pipeline.cluster import autoscaler_limits

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass(frozen=True)
class Row:
    check: str
    where: str
    detail: str
    verdict: str


def worker_need(cfg: PretrainConfig) -> dict[str, float]:
    need = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if cfg.scaling.use_gpu:
        need["GPU"] = need.get("GPU", 0) or 1.0
    return {k: float(v) for k, v in need.items() if float(v) > 0}


def alive_nodes() -> list[dict]:
    import ray
    return [n for n in ray.nodes() if n.get("Alive")]


def node_label(n: dict) -> str:
    return f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})"


def placement_rows(cfg: PretrainConfig, nodes: list[dict]) -> list[Row]:
    """How many workers each node holds, greedily packed as ``PACK`` places them, and whether the
    CPUs left on the cluster cover one decode task; the last row is the verdict."""
    need = worker_need(cfg)
    want = cfg.scaling.num_workers
    rows, placed, spare_cpu = [], 0, 0.0
    for n in sorted(nodes, key=lambda n: -min(n["Resources"].get(k, 0.0) / v for k, v in need.items())):
        res = n["Resources"]
        fits = int(min((res.get(k, 0.0) + 1e-9) // v for k, v in need.items()))
        take = min(fits, want - placed)
        placed += take
        spare_cpu += res.get("CPU", 0.0) - take * need.get("CPU", 0.0)
        rows.append(Row("node", node_label(n), f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs: holds "
                        f"{fits} workers, {take} placed", OK))
    short = want - placed
    what = " + ".join(f"{v:g} {k}" for k, v in need.items())
    if short > 0:
        scaling = bool(autoscaler_limits())
        rows.append(Row("workers", "cluster", f"{want} workers of {what} each: {short} do not fit on today's nodes"
                        + ("; the autoscaler may add nodes" if scaling else
                           ": lower scaling.num_workers or what each worker asks for, or add nodes"),
                        WARN if scaling else FAIL))
    else:
        rows.append(Row("workers", "cluster", f"{want} workers of {what} each fit", OK))
    decode = cfg.data.decode_cpus
    rows.append(Row("decode CPUs", "cluster", f"{spare_cpu:g} CPUs left beside the workers for decode tasks of "
                    f"{decode:g}", OK if spare_cpu + 1e-9 >= decode + 0.01 else FAIL))
    return rows


def check_placement(cfg: PretrainConfig, what: str) -> None:
    """At launch: refuse in one line a run whose workers cannot be placed on the cluster's nodes
    (per node: 8 workers of 1 GPU do not fit on two nodes of 4 GPUs and one of 0 with 8 in total)."""
    bad = [r for r in placement_rows(cfg, alive_nodes()) if r.verdict == FAIL]
    if bad:
        raise UserError(f"{what}: {bad[0].detail}")
