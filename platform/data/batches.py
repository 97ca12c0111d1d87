"""One worker's share of a split, as numpy batches: what the training loop iterates.

A split held in Ray's object store (``train.put_in_memory``) is sliced here, every
``world_size``-th row from ``rank`` on (zero-copy views of the node's one shared copy), and
served in a fresh seeded permutation each epoch, so a run resumed mid-epoch skips exactly the
batches it trained. Any other split streams from the worker's Ray Data shard, shuffled in a local
buffer. Training shares are equal, as DDP needs (the remainder rows wait for another epoch's
permutation); evaluation shares are not, so that every validation row is scored exactly once
whatever the number of workers.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import numpy as np
from ray.train import DataConfig

Batches = Callable[..., Iterator[dict]]  # (shuffle_seed: int | None, skip: int = 0) -> numpy batches


def from_memory(rows: dict[str, np.ndarray], rank: int, world_size: int, batch_size: int, equal: bool) -> Batches:
    """This rank's rows of a split held in memory; ``equal``: every rank the same number (for training)."""
    n = len(next(iter(rows.values())))
    end = n // world_size * world_size if equal else n
    mine = {k: v[rank:end:world_size] for k, v in rows.items()}
    count = len(next(iter(mine.values())))

    def batches(shuffle_seed: int | None, skip: int = 0):
        order = np.random.default_rng(shuffle_seed).permutation(count) if shuffle_seed is not None else np.arange(count)
        for start in range(skip * batch_size, count, batch_size):
            picked = order[start:start + batch_size]
            yield {k: v[picked] for k, v in mine.items()}  # a copy: the shared rows are read-only

    return batches


def streamed(shard, batch_size: int, buffer_rows: int) -> Batches:
    """This rank's Ray Data shard (a ``DataIterator``), shuffled in a buffer of ``buffer_rows`` when seeded."""
    def batches(shuffle_seed: int | None, skip: int = 0):
        shuffle = {} if shuffle_seed is None else {"local_shuffle_seed": shuffle_seed,
                                                   "local_shuffle_buffer_size": buffer_rows}
        return itertools.islice(shard.iter_batches(batch_size=batch_size, batch_format="numpy", **shuffle), skip, None)

    return batches


TRAINED = ("train", "adapt")  # the splits every step reads a batch of: equal shares on every rank


class EveryEvaluationRow(DataConfig):
    """Ray Train's split of the streamed splits over workers: equal shares of the trained splits (DDP
    steps in lockstep), every row of the others exactly once (``equal=False``: no remainder row dropped)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = super().configure({k: v for k, v in datasets.items() if k in TRAINED}, world_size,
                                   worker_handles, worker_node_ids, **kwargs)
        for name, dataset in datasets.items():
            if name not in TRAINED:
                dataset = dataset.copy(dataset)
                dataset.set_name(name)
                dataset.context.execution_options = self.default_ingest_options()  # as Ray Train's own split
                for rank, split in enumerate(dataset.streaming_split(world_size, equal=False)):
                    output[rank][name] = split
        return output
