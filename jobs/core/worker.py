"""The function every Ray Train worker runs: ``train_loop_per_worker``.

Kept in a module of its own that imports nothing heavy, so that the worker asks for its dataset
shard before anything else: that starts Ray Data's split coordinator (an actor: a process to
start and import) while this worker imports torch, builds the model and resumes, instead of
after: on 2 cores that overlap is ~4 s of a run's time to its first step.
"""

from __future__ import annotations


def shards(config: dict) -> None:
    """Ask for the dataset shards first: that starts their split coordinators now (a segmented
    stream's second one too, whose process start would otherwise fall at the first seam)."""
    import ray.train
    ray.train.get_dataset_shard("train")
    if config["plan"].segment_epochs:
        ray.train.get_dataset_shard("train_next")


def train_loop_per_worker(config: dict) -> None:
    shards(config)  # the trainer reads them later

    from jobs.core.config import PretrainConfig
    from jobs.core.trainer import Trainer
    run(Trainer(PretrainConfig.from_dict(config["cfg"]), config["plan"]))


def finetune_loop_per_worker(config: dict) -> None:
    """The same for fine-tuning and the linear probe (:class:`jobs.core.finetuner.FineTuner`)."""
    shards(config)

    from jobs.core.finetune_config import FinetuneConfig
    from jobs.core.finetuner import FineTuner
    run(FineTuner(FinetuneConfig.from_dict(config["cfg"]), config["plan"]))


def run(trainer) -> None:
    """The attempt: fit, then close (the last save completed after a clean end only)."""
    ok = False
    try:
        trainer.fit()
        ok = True
    finally:
        trainer.close(ok)
