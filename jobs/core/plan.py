"""The run plan: what the driver works out once and hands every Train worker (``train_loop_config``).

Made by :func:`jobs.core.launch.make_plan` from the config, the data source and the run's last
complete checkpoint; completed with the data stream once the dataset is built. Frozen: a worker
reads it, never changes it. Torch-free (the driver that makes it may never import torch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

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
    vis: dict[str, np.ndarray] | None = None    # {"patches": uint8 [N, L, D], "noise": float32 [N, L]}
    probe: dict[str, np.ndarray] | None = None  # k-NN probe: {"train", "train_y", "val", "val_y"}
    stream: Stream | None = None                # the run's data order (set once the dataset is built)
    position: Any = None                        # the stream's resume-position actor (pipeline.stream)
    faults: Faults | None = None                # test-only fault injection (jobs.core.faults)

    def with_stream(self, stream: Stream, position) -> "RunPlan":
        return replace(self, stream=stream, position=position)
