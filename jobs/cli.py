"""The ``mae`` command: one subcommand per job; each is also ``python -m jobs.<name>``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("jobs.prepare", "shard a folder/bucket of images into Parquet + manifest"),
    "pretrain": ("jobs.pretrain", "distributed MAE pretraining (Ray Train + FSDP2)"),
    "finetune": ("jobs.finetune", "fine-tune a pretrained encoder as a classifier (the paper's recipe), or --linprobe"),
    "evaluate": ("jobs.evaluate", "k-NN and linear probes of a checkpoint; --finetuned: top-1/top-5 of a classifier"),
    "tune": ("jobs.tune", "search mask ratio / decoder depth; each trial a distributed run"),
    "preflight": ("jobs.preflight", "check the cluster a run would use: nodes, storage from every node, auth, all-reduce"),
    "submit": ("jobs.submit", "submit any of the above as a Ray job to a cluster; --follow streams its logs"),
    "jobs": ("jobs.jobctl", "list / status / logs / stop the cluster's jobs"),
    "ckpt": ("jobs.ckpt", "list / pull / export checkpoints from object storage"),
    "demo": ("jobs.demo", "end-to-end demo on real images (scikit-learn digits), on a local Ray cluster"),
}


def usage() -> str:
    lines = ["usage: mae COMMAND [ARGS...]   (mae COMMAND --help for details)", "", "commands:"]
    lines += [f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"mae: error: unknown command {cmd!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
