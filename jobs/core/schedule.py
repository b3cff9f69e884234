"""What falls on a step: log, report, checkpoint, picture, stop. One place for the run's cadence."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Moments:
    log: bool         # a log line (rank 0, local files); also at every report and checkpoint
    report: bool      # a metrics-only report to Ray (a Tune scheduler's result), if rank 0's clock agrees
    checkpoint: bool  # a save (it carries a report)
    picture: bool     # the reconstruction picture
    stop: bool        # the attempt ends after this step (the run's last step, or a test's stop)


@dataclass(frozen=True)
class Cadence:
    """Every ``log_every`` / ``report_every`` / ``ckpt_every`` / ``vis_every`` steps, and a
    checkpoint and a picture at the end of the run or of the attempt (``stop_after`` steps of it)."""
    total: int
    log_every: int
    report_every: int
    ckpt_every: int
    vis_every: int
    start: int = 0
    stop_after: int = -1

    @classmethod
    def of(cls, train, total: int, start: int, stop_after: int = -1) -> "Cadence":
        """From the config's ``train`` section (``vis_every`` 0: at checkpoints)."""
        return cls(total=total, log_every=train.log_every, report_every=train.report_every,
                   ckpt_every=train.ckpt_every, vis_every=train.vis_every or train.ckpt_every,
                   start=start, stop_after=stop_after)

    def at(self, step: int) -> Moments:
        end = step >= self.total or (self.stop_after > 0 and step - self.start >= self.stop_after)
        ckpt = step % self.ckpt_every == 0 or end
        report = self.report_every > 0 and step % self.report_every == 0 and not ckpt
        log = step % self.log_every == 0 or ckpt or report
        return Moments(log=log, report=report, checkpoint=ckpt, picture=log and (step % self.vis_every == 0 or end),
                       stop=end)
