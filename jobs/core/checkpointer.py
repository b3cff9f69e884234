"""A worker's side of the checkpoint protocol: pick and load the checkpoint to resume from, save,
upload, and complete each save (the files themselves: :mod:`jobs.core.checkpoint`).

A save, on every rank: with ``train.async_checkpoint`` (the default), a copy of its state in host
memory on the training path, then in Ray Train's upload thread its DCP shard written from that
copy to the node's scratch disk, hashed and uploaded; without, the shard written and uploaded on
the training path. Then this rank's file list to rank 0 once its shard is in storage. Rank 0,
holding every rank's list, writes ``manifest.json``, the ``COMPLETE`` marker and the index, and
prunes (:class:`jobs.core.checkpoint.Finalizer`). So a marker never precedes the last shard, and a
save killed anywhere leaves a checkpoint resume never takes. One save is in flight at a time.
"""

from __future__ import annotations

import datetime
import functools
import shutil
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch.distributed as dist

from jobs.core import checkpoint as ckpt
from jobs.core.common import say
from jobs.core.faults import Faults
from pipeline.private_api import ray_would_retry_upload
from pipeline.storage import Store


@dataclass(frozen=True)
class Resumed:
    uri: str
    step: int
    metrics: dict       # the checkpoint's metrics (the result of a run that has nothing left to train)
    world_size: int     # of the attempt that saved it
    restored_rng: bool  # the per-rank RNG came back too (same world size)


class Checkpointer:
    """``choose()`` then ``load()`` once, ``save(...)`` at checkpoint steps, ``close(ok)`` at the
    end of the attempt."""

    def __init__(self, cfg, run: Store, *, rank: int, world: int, scratch: str, cpu_group,
                 global_batch: int, config_yaml: str, faults: Faults | None = None):
        import ray.train
        self.cfg, self.run, self.rank, self.world = cfg, run, rank, world
        self.scratch, self.cpu_group, self.faults = scratch, cpu_group, faults
        self.global_batch, self.config_yaml = global_batch, config_yaml
        self.storage = ray.train.get_context().get_storage()  # where Ray Train persists checkpoints
        # The upload threads' own group: their one gather per save (the file lists, once every
        # rank's upload is in storage) never meets a collective of the training thread.
        self.upload_group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
                             if world > 1 else None)
        self.finalizer = None        # rank 0: completes saves, keeps the index
        self.saving: Future | None = None  # this rank's last save, whose upload may still be in flight
        self.aborted = False         # the attempt ended while an upload was in flight
        self.last_stall: float | None = None  # the last save's time on the training path (s)
        self.stager = None           # train.async_checkpoint: host copies of the state, reused per save
        self.last_step = 0           # the step of the newest checkpoint known complete (resumed or waited for)
        self.saving_step = 0         # the step of the save in ``saving``

    def _broadcast(self, obj):
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    # ------------------------------------------------------------------ resume
    def choose(self) -> dict | None:
        """Collective: the newest complete checkpoint, chosen once by rank 0 from the index for
        every rank, with its ``train_state.json`` ({"uri", "state"}); None: none yet. Cheap (two
        small reads): the data stream can start from its position before the weights load."""
        choice = None
        if self.rank == 0:  # the index is read once per attempt, here
            self.finalizer = ckpt.Finalizer(self.run, self.cfg.train.keep_last, self.cfg.train.best_metric,
                                            best_mode=self.cfg.train.best_mode)
            latest = self.finalizer.latest()
            if latest:
                choice = {"uri": latest["uri"], "state": ckpt.read_train_state(self.run.child(latest["name"]))}
        return self._broadcast(choice)

    def load(self, choice: dict | None, model, opt) -> Resumed | None:
        """Load the checkpoint of :meth:`choose` into ``model`` and ``opt``: each rank reads its
        shards straight from storage (FSDP2, HSDP), or rank 0 reads the whole state once and
        broadcasts it (DDP); None: ``choice`` is None."""
        if not choice:
            return None
        st = choice["state"]
        if st.get("global_batch", self.global_batch) != self.global_batch:  # the driver adapts accum; guard
            raise RuntimeError(f"resume: global batch {self.global_batch} != saved {st['global_batch']}")
        restored = ckpt.load_into(model, opt, Store(choice["uri"]), rank=self.rank,
                                  restore_rng=st.get("world_size") == self.world, group=self.cpu_group)
        self.last_step = st["step"]
        return Resumed(uri=choice["uri"], step=st["step"], metrics=st.get("metrics") or {},
                       world_size=st["world_size"], restored_rng=bool(restored))

    # ------------------------------------------------------------------ save
    def busy(self) -> bool:
        """A save's upload is still in flight on this rank."""
        return self.saving is not None and not self.saving.done()

    def save(self, model, opt, step: int, metrics: dict, state: dict, before_marker=None) -> None:
        """Collective: every rank writes its shard to the node's disk and hands it to Ray Train's
        upload, with a report of ``metrics``; the loop goes on. ``state`` joins ``train_state.json``;
        rank 0's upload calls ``before_marker`` before the marker (the metrics log's upload: a
        complete checkpoint implies its metrics are stored), off the training thread."""
        import ray.train
        from ray.train import CheckpointUploadMode
        name = ckpt.ckpt_name(step)
        local = tempfile.mkdtemp(prefix="mae-ckpt-", dir=self.scratch)
        t0 = time.perf_counter()
        state = {"step": step, "images_seen": step * self.global_batch, **state, "metrics": metrics,
                 "world_size": self.world, "global_batch": self.global_batch, "time": time.time()}
        entry = None
        self.wait()  # rank 0: the previous save is complete (marker, index, pruning) before this one starts
        if self.rank == 0:
            # A directory of this name from an attempt that died after its marker is no longer
            # complete once new files start landing in it.
            self.run.rm([f"{name}/{ckpt.MARKER}"])
            entry = {"name": name, "step": step, "complete": True, "metrics": metrics, "time": state["time"]}
        self.saving, self.saving_step = Future(), step
        background = self.cfg.train.async_checkpoint
        staged = None
        if background:  # on the training path: a copy of the state in host memory, and small files
            if self.stager is None:
                import torch
                self.stager = ckpt.make_stager(pin_memory=torch.cuda.is_available())
            staged = ckpt.stage(model, opt, self.stager)
            ckpt.write_small(local, rank=self.rank, train_state=state, config_yaml=self.config_yaml)
        else:
            ckpt.write_local(model, opt, local, rank=self.rank, train_state=state, config_yaml=self.config_yaml)
        ray.train.report({**metrics, "checkpoint_step": step}, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC,
                         checkpoint_upload_fn=functools.partial(self._upload, local=local, step=step, entry=entry,
                                                                done=self.saving, before_marker=before_marker,
                                                                staged=staged),
                         delete_local_checkpoint_after_upload=False)  # _upload removes it
        self.last_stall = time.perf_counter() - t0
        if self.rank == 0:
            say(f"[mae] checkpoint {name} written, uploading{' in the background' if background else ''} "
                f"({self.last_stall:.2f}s on the training path)")

    def _upload(self, checkpoint, dir_name: str, *, local: str, step: int, entry: dict | None, done: Future,
                before_marker=None, staged: dict | None = None):
        """Ray Train's upload of this rank's files (its upload thread with ``async_checkpoint``),
        then: this rank's file list to rank 0, whose finalizer completes the checkpoint.

        Runs exactly once per save on every rank (the gather below must pair up across ranks), so
        nothing raised here may look retryable to Ray's own retry of a checkpoint upload: transient
        storage errors are retried here, before the gather."""
        try:
            if staged is not None:  # the shard written from its host copy, here, off the training path
                ckpt.write_staged(staged, local, group=self.upload_group, world=self.world)
            files = ckpt.file_manifest(local)  # hashed here, off the training path
            if self.faults is not None:  # test-only: this rank may die here, before its shard lands
                self.faults.in_upload(step, self.run, self.rank, self.world)
            persisted = self._persist(checkpoint, dir_name)
            # removed here, not by Ray after this returns: the end of the attempt (which waits for
            # ``done``) removes the whole scratch directory, and the two deletes raced
            shutil.rmtree(local, ignore_errors=True)
            if before_marker is not None:  # rank 0: the metrics log up to this step, stored before the marker
                before_marker()
            self._complete(dir_name, step, files, entry)
        except BaseException as e:
            if not done.done():
                done.set_exception(e)
            if ray_would_retry_upload(str(e)):  # Ray's retry matches these: it must never run this twice
                raise RuntimeError(f"checkpoint {dir_name}: rank {self.rank}'s upload failed ({type(e).__name__})") from e
            raise
        if not done.done():
            done.set_result(None)
        return persisted

    def _complete(self, dir_name: str, step: int, files: dict, entry: dict | None) -> None:
        """Every rank's file list to rank 0 (returns there once every rank's upload is in storage),
        which writes the manifest, the marker and the index."""
        gathered = [None] * self.world if self.rank == 0 else None
        if self.upload_group is None:
            gathered = [(step, files)]
        else:
            dist.gather_object((step, files), gathered, dst=0, group=self.upload_group)
        if self.rank == 0:
            steps = {s for s, _ in gathered}
            if steps != {step}:  # never a marker over another save's files
                raise RuntimeError(f"checkpoint {dir_name}: the ranks' uploads are of steps {sorted(steps)}")
            self.finalizer.complete(entry, [f for _, f in gathered], self.world)

    def _persist(self, checkpoint, dir_name: str, tries: int = 3):
        """This rank's files into the run directory (Ray's copy), transient errors retried with
        backoff; a final failure is raised as an error Ray will not retry (see ``_upload``)."""
        for i in range(tries):
            try:
                return self.storage.persist_current_checkpoint(checkpoint, dir_name)
            except Exception as e:  # noqa: BLE001 - re-raised below, once the tries are spent
                if i == tries - 1 or self.aborted:
                    raise RuntimeError(f"checkpoint {dir_name}: the upload of rank {self.rank}'s shard failed "
                                       f"{i + 1} times ({type(e).__name__}); the run resumes from the last "
                                       "complete checkpoint") from e
                time.sleep(2 ** i)

    def wait(self) -> None:
        """This rank's last upload is in storage (rank 0: the checkpoint is complete), or its error
        is raised here. Every save has exactly one upload, in order (one upload thread per worker)."""
        if self.saving is not None:
            saving, self.saving = self.saving, None
            saving.result()
            self.last_step = self.saving_step

    def close(self, ok: bool) -> None:
        """End of the attempt: after a clean end, the last save is waited for (rank 0: complete;
        its error raised here). After a failure nothing is waited for: the error is the attempt's."""
        if ok:
            self.wait()

    def release_scratch(self) -> bool:
        """-> whether the scratch directory may go: not while an upload still copies from it
        (deleting under it could land part of a shard, and a marker over it). Such an upload is
        marked aborted (no more retries); the next attempt's cleanup of dead owners' dirs removes it."""
        if self.busy():
            self.aborted = True
            return False
        return True
