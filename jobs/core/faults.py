"""Fault injection for the fault-tolerance tests: not a user setting, off the hot path when unset.

The driver reads ``MAE_TEST_FAULTS`` (JSON) from its own environment and hands it to the workers
in the plan (:class:`jobs.core.plan.RunPlan`), so a test sets it with ``monkeypatch.setenv``
around one ``fit`` call. Keys:

- ``crash_at_step`` with ``crash_in_upload``: SIGKILL rank 1 inside its upload of the checkpoint
  of that step, before its shard lands (a worker lost mid-save);
- ``kills``: ``[[step, "step" | "upload"], ...]``: SIGKILL rank ``step % world`` right after that
  training step, or inside its upload of that step's checkpoint; each once per run (a chaos run);
- ``stop_after_steps``: return cleanly after this many steps of the attempt (a stopped job);
- ``step_sleep_s``: sleep this long after every step (a slow run, for events that must land mid-run);
- ``raising_tracker``: rank 0 logs to one more tracker, whose every call raises.

"Once" is per run: the victim leaves ``crash_injected`` (``crash_injected_<where>_<step>`` for ``kills``)
in the run directory before it dies.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, fields

ENV = "MAE_TEST_FAULTS"
MARK = "crash_injected"


@dataclass(frozen=True)
class Faults:
    crash_at_step: int = -1
    crash_in_upload: bool = False
    kills: tuple = ()
    stop_after_steps: int = -1
    step_sleep_s: float = 0.0
    raising_tracker: bool = False

    @classmethod
    def from_env(cls) -> "Faults | None":
        raw = os.environ.get(ENV, "").strip()
        if not raw:
            return None
        d = json.loads(raw)
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"{ENV}: unknown key(s) {sorted(set(d) - known)}; known: {sorted(known)}")
        if "kills" in d:
            d["kills"] = tuple((int(step), where) for step, where in d["kills"])
            if any(where not in ("step", "upload") for _, where in d["kills"]):
                raise ValueError(f"{ENV}: kills are [step, 'step' | 'upload'] pairs, not {d['kills']}")
        return cls(**d)

    def crash_in_upload_of(self, step: int) -> bool:
        return self.crash_in_upload and self.crash_at_step == step

    def in_upload(self, step: int, run, rank: int, world: int) -> None:
        """Inside this rank's upload of checkpoint ``step``, before its shard lands: SIGKILL it if
        it is a victim here (``crash_at_step`` with ``crash_in_upload``: rank 1; ``kills``)."""
        if self.crash_in_upload_of(step):
            kill_victim(run, rank, f"uploading checkpoint {step}", victim=min(1, world - 1))
        self.kill_at(step, "upload", run, rank, world)

    def kill_at(self, step: int, where: str, run, rank: int, world: int) -> None:
        """``kills``: SIGKILL this rank here if it is the step's victim and the kill has not happened."""
        if (step, where) in self.kills:
            kill_victim(run, rank, f"after step {step}" if where == "step" else f"uploading checkpoint {step}",
                        victim=step % world, mark=f"{MARK}_{where}_{step}")


def kill_victim(run, rank: int, when: str, *, victim: int, mark: str = MARK) -> None:
    """SIGKILL this rank if it is ``victim``, once per run (per ``mark`` in the run directory);
    every other rank returns."""
    from jobs.core.common import say
    if rank != victim or run.exists(mark):
        return
    run.write(mark, b"1")
    say(f"[mae] test fault: SIGKILL rank {rank} (pid {os.getpid()}) {when}")
    os.kill(os.getpid(), signal.SIGKILL)


class RaisingTracker:
    """A tracker whose every call raises (``raising_tracker``)."""
    name = "raising"

    def __getattr__(self, method: str):
        def fail(*args, **kwargs):
            raise RuntimeError(f"raising tracker: {method} refused")
        return fail
