"""``python -m platform.data task=classification [data.* ...]``: build a task's dataset, summarise it, preview it.

    python -m platform.data data.preset=model_i data.num_train=5000          # simulate
    python -m platform.data data.source=folder data.path=/data/dataset       # convert a DeepLense folder

Writes the Parquet shards where training will look for them (the data cache), prints
each split's size, classes and location and the training images' statistics (sky level and
noise, light at the centre, neighbours, rings: ``platform/data/calibration.py``) beside the
targets of ``data.preset`` when it is a calibrated one (``hsc``, ``test1``): for simulated
images, how close the simulator is to the real files; for a real folder, how close it is to the
files the preset was calibrated on. Saves a PNG grid of examples per class.
"""

from __future__ import annotations

import os

import numpy as np

from platform import cli, registry
from platform import config as config_lib
from platform.data import shards as shards_lib

STATISTICS_ROWS = 2000  # enough for each figure to its second digit; a few seconds


def main(argv: list[str]) -> int:
    task_name, overrides = config_lib.parse_cli(argv)
    cfg = config_lib.build(task_name, [overrides])
    built = registry.task_of(cfg).build_data(cfg)
    splits = built[0] if isinstance(built, tuple) else built
    for split, shards in splits.items():
        m = shards.manifest
        counts = ", ".join(f"{name}={n}" for name, n in zip(m.get("classes", []), m.get("counts", [])))
        print(f"{split:>5}: {shards.num_rows} images {tuple(shards.image_shape)}  {counts}  "
              f"sha256 {m['content_hash'][:12]}  {shards.path}")
    for line in statistics_report(splits["train"], cfg.data.preset):
        print(line)
    images, labels = preview_rows(splits["train"])
    from platform.data.simulate import preview_grid

    train_path = splits["train"].path
    # Beside the shards; in the current directory when they are on object storage.
    preview = f"preview-{os.path.basename(train_path.rstrip('/'))}.png" if shards_lib.is_uri(train_path) \
        else os.path.join(train_path, "preview.png")
    preview_grid(images, labels, preview, class_names=tuple(splits["train"].manifest.get("classes", ("all",))))
    print(f"preview: {preview}")
    return 0


def statistics_report(shards, preset: str, rows: int = STATISTICS_ROWS) -> list[str]:
    """The statistics of the split's first ``rows`` images, beside ``preset``'s targets."""
    from platform.data import calibration

    images, labels = [], []
    for batch in shards_lib.batches(shards, 256):
        images.append(shards_lib.decode_images(batch))
        labels.append(batch.get("label", np.zeros(len(images[-1]), np.int64)))
        if sum(len(i) for i in images) >= rows:
            break
    images, labels = np.concatenate(images)[:rows], np.concatenate(labels)[:rows]
    classes = tuple(shards.manifest.get("classes", ()))
    stats = calibration.image_statistics(images, labels, classes)
    bands = ("g", "r", "i") if images.shape[1] == 3 else ()
    return [f"{len(images)} training images measured"] + calibration.report(stats, preset, bands)


def preview_rows(shards, per_class: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_class`` images of each class, read a batch at a time until they are found: a
    preview of a split of any size, never the whole split in memory."""
    classes = len(shards.manifest.get("classes", [])) or 1
    images, labels = [], []
    for batch in shards_lib.batches(shards, 256):
        batch_labels = batch.get("label", np.zeros(len(batch["image"]), np.int64))
        decoded = shards_lib.decode_images(batch)
        for image, label in zip(decoded, batch_labels):
            if labels.count(label) < per_class:
                images.append(image)
                labels.append(label)
        if len(labels) >= per_class * classes:
            break
    return np.stack(images), np.asarray(labels, dtype=np.int64)


if __name__ == "__main__":
    cli.exit_with(main)
