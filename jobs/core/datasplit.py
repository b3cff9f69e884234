"""How a run's datasets reach its workers: the training stream split equally (Ray Train's default:
every rank takes the same number of batches), the validation set split unequally, so that every
image is scored exactly once (an equal split drops up to ``world - 1`` images at the end).

Unpickled by the Train controller: torch-free."""

from __future__ import annotations

import ray.train


class ValSplit(ray.train.DataConfig):
    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k != "val"}
        out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            ds = datasets["val"]
            if ds.name is None:
                ds.set_name("val")
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                out[i]["val"] = split
        return out
