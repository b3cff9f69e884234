"""What the Train controller pays for torch: Ray's public ``TorchConfig`` against ours, in one run.

``ray.train.torch.TorchConfig``'s module imports torch at its top; the config travels to the Train
controller actor, which then imports torch only to tell the workers to connect.
``jobs.core.backend.ProcessGroupConfig`` takes the same steps from a module without torch (on
private Ray symbols: ``pipeline/private_api.py``). Here both set up the same 2-worker gloo group
on a local Ray (CPU), alternately, ``--rounds`` times each: every worker all-reduces one tensor
and reports once. A Ray Train callback (it runs in the controller) records the controller
process's CPU time (user + system, since the process started) and resident memory at that report,
and whether it has imported torch.

    python -m bench.controller_torch [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

from tests.support import RAY_LOCAL_ENV, apply_ray_env


def _train(config):
    import ray.train
    import torch
    import torch.distributed as dist
    t = torch.ones(1)
    dist.all_reduce(t)
    ray.train.report({"sum": float(t.item())})


def _probe(path: str):
    """A Ray Train callback, defined here so that cloudpickle ships it by value to the controller."""
    import ray.train

    class ControllerProbe(ray.train.UserCallback):
        def __init__(self, path):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            import resource
            import sys
            ru = resource.getrusage(resource.RUSAGE_SELF)
            with open("/proc/self/status") as f:
                rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
            with open(self.path, "w") as f:
                json.dump({"cpu_s": ru.ru_utime + ru.ru_stime, "rss_mib": rss, "pid": os.getpid(),
                           "torch": "torch" in sys.modules}, f)

    return ControllerProbe(path)


def run_once(kind: str, tmp: str, i: int) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from jobs.core.backend import ProcessGroupConfig
    out = os.path.join(tmp, f"{kind}-{i}.json")
    backend = ProcessGroupConfig(backend="gloo") if kind == "ours" else TorchConfig(backend="gloo")
    DataParallelTrainer(
        _train, backend_config=backend,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"{kind}-{i}", storage_path=os.path.join(tmp, "runs"),
                                       callbacks=[_probe(out)]),
    ).fit()
    with open(out) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    apply_ray_env({**RAY_LOCAL_ENV, "RAY_TRAIN_V2_ENABLED": "1"})
    tmp = tempfile.mkdtemp(prefix="mae-bench-controller-")
    got: dict[str, list[dict]] = {"ours": [], "public": []}
    try:
        from jobs.core.common import init_ray
        init_ray(num_cpus=2)
        for i in range(a.rounds):
            for kind in ("ours", "public"):
                r = run_once(kind, tmp, i)
                got[kind].append(r)
                print(f"  {kind:6s} round {i}: controller {r['cpu_s']:.2f} CPU-s, {r['rss_mib']:.0f} MiB, "
                      f"torch imported: {r['torch']}", flush=True)
    finally:
        import ray
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("cpu_s", "rss_mib")} for k, v in got.items()}
    print(f"Train controller of a 2-worker gloo run, median of {a.rounds}, at the run's report:")
    print(f"  public TorchConfig:          {med['public']['cpu_s']:.2f} CPU-s, {med['public']['rss_mib']:.0f} MiB")
    print(f"  ours (ProcessGroupConfig):   {med['ours']['cpu_s']:.2f} CPU-s, {med['ours']['rss_mib']:.0f} MiB")
    print(f"  public - ours:               {med['public']['cpu_s'] - med['ours']['cpu_s']:.2f} CPU-s, "
          f"{med['public']['rss_mib'] - med['ours']['rss_mib']:.0f} MiB per run")


if __name__ == "__main__":
    main()
