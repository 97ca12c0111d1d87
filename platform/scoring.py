"""A model scored on a whole split, in one process: the test split once at the end of a run, and
any data for ``platform.evaluate``. The task's own ``collate``, ``eval_step``, ``evaluate`` and
``plots``, every row once and in order, so a score here is the number the loop would give.

A binary finder is scored at the threshold its run chose on the validation split
(``threshold=``): choosing it again on the data being scored would tune on the test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from platform.data import shards as shards_lib

PREDICTIONS = "predictions"  # artifact folder of the per-row predictions of a scored split


@dataclasses.dataclass
class Scored:
    metrics: dict  # the task's metrics over every row
    outputs: dict  # eval_step's per-row outputs, every row in order: name -> (N, ...) array
    columns: dict  # the split's per-row data that are not images: file, label, truth parameters
    first_batch: dict  # one collated batch on the device, for the task's plots


def device_for(use_gpu: bool) -> torch.device:
    """The GPU when the config asks for one and this machine has it, else the CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _data_columns(batch: dict, shards: shards_lib.Shards) -> dict:
    """The per-row columns of a numpy batch that are not stored images."""
    images = ["", *(c + "_" for c in shards.manifest.get("image_columns", {}))]
    stored = {p + k for p in images for k in ("image", "channels", "height", "width")}
    stored |= set(shards.manifest.get("image_columns", {}))
    return {k: np.asarray(v) for k, v in batch.items() if k not in stored}


def evaluate(task, outputs: dict, cfg, threshold: float | None = None) -> dict:
    """The task's metrics of ``outputs``; a binary finder's at ``threshold`` when one is given."""
    if task.threshold_metric and threshold is not None:
        return task.evaluate(outputs, cfg, threshold=threshold)
    return task.evaluate(outputs, cfg)


def figures(task, model, scored: Scored, cfg, threshold: float | None = None) -> dict:
    """The task's plots of a scored split ({} for a task without plots)."""
    if task.plots is None:
        return {}
    model.eval()
    with torch.no_grad():
        if task.threshold_metric and threshold is not None:
            return task.plots(model, scored.first_batch, scored.outputs, cfg, threshold=threshold)
        return task.plots(model, scored.first_batch, scored.outputs, cfg)


def score(model, task, cfg, shards: shards_lib.Shards, device: torch.device,
          threshold: float | None = None) -> Scored:
    """``model`` (its weights as they are) on every row of ``shards``, on ``device``."""
    model = model.to(device).eval()
    chunks, columns, first_batch = [], [], None
    with torch.no_grad():
        for numpy_batch in shards_lib.batches(shards, cfg.train.batch_size):
            columns.append(_data_columns(numpy_batch, shards))
            batch = _on(task.collate(numpy_batch, cfg, False), device)
            first_batch = first_batch or batch
            out = task.eval_step(model, batch, cfg)
            chunks.append({k: v.detach().float().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
                           for k, v in out.items()})
    if not chunks:
        raise ValueError(f"{shards.path}: no rows to score")
    outputs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    data = {k: np.concatenate([c[k] for c in columns]) for k in columns[0]}
    return Scored(evaluate(task, outputs, cfg, threshold), outputs, data, first_batch)


WIDEST_OUTPUT = 16  # columns a (N, K) output may take in a predictions table; wider ones are features


def predictions(scored: Scored, class_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """One row per scored image: its position, its file (real data), the truth where known and the
    model's outputs. A (N, K) output becomes K columns (``probs`` named by class); image-sized
    outputs and feature vectors (wider than ``WIDEST_OUTPUT``) are left out."""
    n = len(next(iter(scored.outputs.values())))
    table = {"row": np.arange(n)}
    for name, values in {**scored.columns, **scored.outputs}.items():
        values = np.asarray(values)
        if len(values) != n or values.ndim > 2 or name in table or (values.ndim == 2 and values.shape[1] > WIDEST_OUTPUT):
            continue
        if values.ndim == 2:
            by_class = name == "probs" and class_names and values.shape[1] == len(class_names)
            names = class_names if by_class else range(values.shape[1])
            table.update({f"{name}_{k}": values[:, j] for j, k in enumerate(names)})
        else:
            table[name] = values
    return table


def write_table(table: dict[str, np.ndarray], path: str) -> str:
    """``table`` as CSV (``.csv``) or Parquet (any other name) at ``path``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    arrow = pa.table({k: pa.array(np.asarray(v).tolist()) for k, v in table.items()})
    if path.endswith(".csv"):
        pacsv.write_csv(arrow, path)
    else:
        pq.write_table(arrow, path)
    return path
