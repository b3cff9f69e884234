"""The suite's longest runs, on real images, started with the session and run beside the other tests.

scikit-learn's 1,797 handwritten digits go through the commands a user runs, each against the shared
test cluster (``RAY_ADDRESS``): ``mae prepare``, then ``mae pretrain`` beside ``mae finetune none``
(the same ViT from random initialization: it needs no pretrained weights), then ``mae finetune`` of the
pretraining run. ``tests/test_evaluate.py`` asserts on what they leave in object storage.

Why they start first: together they keep the 2 cores busy for about 3 minutes, while the tests that use
no Ray run in one process on one core and the job-submission tests mostly wait. Why as processes of
their own: each command's output goes to its log file, never into another test's captured output, and
the fault hook's variable reaches only the run it is meant for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from support import Background, tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The settings of bench/RESULTS.md ("Learning on real images"): 1000 steps of batch 32, lr 1e-3,
# crops keeping >= 80% of the digit, no flips (a flipped digit is another glyph). One decode task:
# on 2 cores, decode tasks free to run ahead took ~0.9 of a core from the trainer for the run's
# first minute, then left it alone on one core.
DIGITS = ("data.crop_scale=[0.8,1.0]", "data.hflip=0", "train.batch_size=32", "train.max_steps=1000",
          "train.log_every=100", "train.ckpt_every=1000", "optim.lr=1e-3", "optim.warmup_steps=20",
          "optim.clip_grad=1.0", "scaling.num_workers=1", "data.decode_concurrency=1",
          "data.segment_images=15000")  # 23 epochs (+1 spare) as segments of 11 (pipeline.segments)

# Fine-tuning at toy scale (bench/RESULTS.md "Fine-tuning on real images"): the official recipe's
# optimizer and regularizers (layer decay 0.65, AdamW (0.9, 0.999), wd 0.05, drop path 0.1, label
# smoothing 0.1, warmup + cosine) for 105 steps; crops keeping >= 80% of the digit and no flips (as
# the pretraining above); RandAugment, mixup / cutmix and random erasing off: with all of them on,
# 210 steps leave both encoders near chance (15.7% from MAE, 8.2% from random init, measured).
FINETUNE = ("data.crop_scale=[0.8,1.0]", "data.hflip=0", "data.auto_augment=", "finetune.mixup=0",
            "finetune.cutmix=0", "finetune.reprob=0", "optim.lr=5e-3", "optim.warmup_epochs=1", "train.epochs=5",
            "finetune.eval_every_epochs=2.5", "train.log_every=50", "data.decode_concurrency=1",
            "run.max_failures=1")

MAE_FAULT = {"crash_at_step": 105, "crash_in_upload": True}
"""The fine-tuning from the MAE loses rank 1 while it uploads its last checkpoint (step 105) and
resumes from step 95's."""


class DigitsRuns:
    """The chain above, in a thread of the test process that starts the commands and waits for them.
    ``result()`` waits for the whole chain: -> ``{"shards", "pretrain", "ft-rand", "ft-mae"}``, each
    run's URI (the fine-tunings' as ``{"run", "log"}``); a failed command raises with its log's tail."""

    def __init__(self, gcs_address: str, bucket: str, workdir: str):
        import threading
        self.env = {**os.environ, "RAY_ADDRESS": gcs_address}
        self.env.pop("MAE_TEST_FAULTS", None)
        self.bucket, self.workdir = bucket, workdir
        self.shards = f"s3://{bucket}/eval-digits-shards"
        self.procs: list[subprocess.Popen] = []
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.job = Background(self._chain)

    def start(self) -> None:
        self.job.start()

    def result(self) -> dict:
        return self.job.result()

    def wait(self) -> None:
        """Until the chain has ended, however (its tests report a failure)."""
        if self.job.thread.ident is not None:
            self.job.thread.join()

    def stop(self) -> None:
        """Kill whatever command is still running (a session cut short), and start no other."""
        self.stopping.set()
        self._kill_all()
        if self.job.thread.ident is not None:
            self.job.thread.join(timeout=60)

    def _kill_all(self) -> None:
        """SIGKILL every command still running, by its process group, and reap it."""
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    def _start(self, name: str, args: list[str], **env) -> tuple[subprocess.Popen, str]:
        log = os.path.join(self.workdir, f"{name}.log")
        with self.lock:
            if self.stopping.is_set():
                raise RuntimeError(f"{name} not started: the session is ending")
            with open(log, "wb") as out:  # the child holds its own descriptor
                p = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env={**self.env, **env}, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(p)
        return p, log

    @staticmethod
    def _wait(started: tuple[subprocess.Popen, str]) -> str:
        p, log = started
        if p.wait() != 0:
            with open(log, errors="replace") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{' '.join(p.args[1:4])} ... exited {p.returncode}; its log ({log}) ends:\n{tail}")
        return log

    def _chain(self) -> dict:
        try:
            return self._commands()
        except BaseException:
            self._kill_all()  # no command outlives the chain's failure: the tests after it have the cluster
            raise

    def _commands(self) -> dict:
        from pipeline.synthetic import write_digits_folder
        src = os.path.join(self.workdir, "digits")
        write_digits_folder(src)
        self._wait(self._start("prepare", ["jobs.prepare", src, self.shards, "--shard-size-mb", "0.05",
                                           "--val-fraction", "0.25", "--shared-fs"]))
        runs, ft = f"s3://{self.bucket}/runs", f"s3://{self.bucket}/ft"
        pretrain = self._start("pretrain", ["jobs.pretrain", *tiny_overrides(self.shards, runs, "eval-digits",
                                                                              *DIGITS, short_run=False)])
        # from random init, its val images named with --val (a prepared dataset's val split, as
        # ImageNet's official val set); on one worker at batch 64
        rand = self._start("ft-rand", ["jobs.finetune", "none", self.shards, "--val", self.shards, *FINETUNE,
                                       f"run.storage_path={ft}", "run.name=ft-rand",
                                       "model.preset=mae_vit_micro_patch4", "scaling.num_workers=1",
                                       "train.batch_size=64"])
        self._wait(pretrain)
        # from the MAE: FSDP over 2 workers at batch 32 (the same global batch), the val split of DATA
        mae = self._start("ft-mae", ["jobs.finetune", f"{runs}/eval-digits", self.shards, *FINETUNE,
                                     f"run.storage_path={ft}", "run.name=ft-mae", "scaling.num_workers=2",
                                     "train.batch_size=32", "scaling.strategy=fsdp", "train.ckpt_every=95"],
                          MAE_TEST_FAULTS=json.dumps(MAE_FAULT))
        return {"shards": self.shards, "pretrain": f"{runs}/eval-digits",
                "ft-rand": {"run": f"{ft}/ft-rand", "log": self._wait(rand)},
                "ft-mae": {"run": f"{ft}/ft-mae", "log": self._wait(mae)}}
