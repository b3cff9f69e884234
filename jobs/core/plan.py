"""The run plan: what the driver works out once and hands every Train worker (``train_loop_config``).

Made by :func:`jobs.core.launch.make_plan` from the config, the data source and the run's last
complete checkpoint; completed with the data stream once the dataset is built. Frozen: a worker
reads it, never changes it. Torch-free (the driver that makes it may never import torch).

Images (the reconstruction picture's, the k-NN probe's: ~115 MB on ImageNet) are not in the plan:
the driver puts each set in Ray's object store once and the plan carries its ``ObjectRef``, which
every worker resolves with :func:`images` (one copy per node, not one pickled into every worker's
``train_loop_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from jobs.core.faults import Faults
from pipeline.stream import Stream


@dataclass(frozen=True)
class RunPlan:
    run_dir: str                 # <run.storage_path>/<run.name>
    global_batch: int            # images per optimizer step, all workers and micro-batches
    accum_steps: int             # micro-batches per optimizer step (a resume on fewer workers raises it)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    precision: str               # bf16 | fp32
    flops_per_image: float       # training FLOPs of one image (MFU)
    rows: int                    # images in one epoch
    t_launch: float              # wall time the command started (launch-to-first-log)
    config_yaml: str             # the resolved config, saved in every checkpoint
    finished: bool               # the run already reached its last step: nothing to train
    vis: Any = None     # ObjectRef of {"patches": uint8 [N, L, D], "noise": float32 [N, L]}, or None
    probe: Any = None   # ObjectRef of the k-NN probe {"train", "train_y", "val", "val_y"}, or None
    stream: Stream | None = None                # the run's data order (set once the dataset is built)
    position: Any = None                        # the stream's resume-position actor (pipeline.stream)
    faults: Faults | None = None                # test-only fault injection (jobs.core.faults)
    num_classes: int = 0                        # fine-tuning: the head's classes
    eval_every: float = 0.0                     # fine-tuning: steps between evaluations on the val set
    segment_epochs: int = 0                     # > 0: the stream comes in segments (pipeline.segments)

    def with_stream(self, stream: Stream, position, segment_epochs: int = 0) -> "RunPlan":
        return replace(self, stream=stream, position=position, segment_epochs=segment_epochs)


def by_reference(images: dict | None):
    """On the driver: ``images`` (a dict of arrays) into Ray's object store, once -> its ObjectRef
    (None stays None). The driver owns it for the run's life: restarted worker groups get it too."""
    if images is None:
        return None
    import ray
    return ray.put(images)


def images(ref) -> dict | None:
    """On a worker: the images of :func:`by_reference` (None stays None). The arrays are copies,
    writable (the object store's are read-only views)."""
    if ref is None:
        return None
    import ray
    import numpy as np
    return {k: np.array(v) for k, v in ray.get(ref).items()}
