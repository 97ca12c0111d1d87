"""``python -m platform.predict model=<model> data.path=FOLDER evaluate.out=predictions.csv``: a
trained model run on a folder of unlabelled ``.npy`` images.

    python -m platform.predict model=models:/lens_finding/latest data.path=/data/new evaluate.out=lenses.csv
    python -m platform.predict model=0a1b2c... data.path=/data/lr evaluate.out=sr/predictions.csv   # superres

Every ``.npy`` below the folder (no class folders needed) is read with the same reader and
checks as training data, all before the first prediction: a file with NaN or infinite pixels,
a blank image, integers, or another shape than the first file's is named in one line. One row
per image: its file and what the task predicts (``Task.predict``): class probabilities and the
most likely class for the classifiers, a lens score and the verdict at the run's own threshold
(chosen on its validation split) for the finder, the parameters in their units for regression.
An image-valued prediction (super-resolution) is written as one ``.npy`` per image beside the
table, under ``<evaluate.out without its extension>_<name>/``, and the table names each file.
``model=`` as for ``platform.evaluate``; ``scaling.use_gpu=true`` runs on this machine's GPU.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from platform import cli, scoring
from platform.config import ConfigError
from platform.data import folders
from platform.data.shards import DataError, progress
from platform.trained import load_model, model_config, run_threshold


def image_files(folder: str) -> list[str]:
    """Every ``.npy`` below ``folder``, sorted, or a one-line error."""
    return folders.npy_files_below(folder, "data.path")


def checked_shape(files: list[str]) -> tuple:
    """Every file read and checked once, before any prediction; the (C, H, W) they all share."""
    shape = first = None
    with progress(len(files), "checking", unit="file") as bar:
        for path in files:
            image = folders.checked_image(folders.load_npy(path), path, None)
            if shape is not None and image.shape != shape:  # named beside the first file, whichever is odd
                raise DataError(f"{path}: found shape {image.shape}; expected {shape} like the files before it "
                                f"(the first: {first})")
            shape, first = image.shape, first or path
            bar.update()
    return shape


def write_images(values: np.ndarray, names: list[str], folder: str) -> list[str]:
    """One ``.npy`` per image (C, H, W) under ``folder``, at each source file's relative name."""
    written = []
    for image, name in zip(values, names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, image.astype(np.float32))
        written.append(path)
    return written


def predict_batch(task, model, paths: list[str], channels: int, device, cfg, threshold) -> dict:
    images = np.stack([folders.checked_image(folders.load_npy(p), p, channels) for p in paths])  # (B, C, H, W)
    extra = {"threshold": threshold} if task.threshold_metric else {}
    with torch.no_grad():
        out = task.predict(model, torch.from_numpy(images).to(device), cfg, **extra)
    return {k: v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in out.items()}


def main(argv: list[str]) -> int:
    task, cfg, settings, source, uri, client = model_config(argv, "predict")
    if task.predict is None:
        raise ConfigError(f"task {task.name} makes no predictions for unlabelled images (no Task.predict); "
                          f"score it on labelled data with python -m platform.evaluate")
    if not any(a.startswith("data.path=") for a in argv) or not settings.evaluate.out:
        raise ConfigError("data.path= (a folder of .npy images) and evaluate.out= (a .csv or .parquet file) are "
                          "both required")
    root = os.path.abspath(os.path.expanduser(cfg.data.path))
    files = image_files(root)
    channels = checked_shape(files)[0]
    model = load_model(task, cfg, source, client)
    device = scoring.device_for(cfg.scaling.use_gpu)
    model.to(device).eval()
    threshold = run_threshold(task, client, source)
    names = [os.path.relpath(p, root) for p in files]
    stem = os.path.splitext(os.path.abspath(settings.evaluate.out))[0]
    table = {"file": np.asarray(names)}
    chunks: list[dict] = []
    with progress(len(files), "predicting", unit="img") as bar:
        for start in range(0, len(files), cfg.train.batch_size):
            out = predict_batch(task, model, files[start:start + cfg.train.batch_size], channels, device, cfg, threshold)
            for key, values in out.items():
                if values.ndim == 4:  # one image per input: a file each
                    out[key] = np.asarray(write_images(values, names[start:start + len(values)], f"{stem}_{key}"))
            chunks.append(out)
            bar.update(len(next(iter(out.values()))))
    outputs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    table.update(scoring.predictions(scoring.Scored({}, outputs, {}, {}), list(cfg.data.classes)))
    table.pop("row")
    os.makedirs(os.path.dirname(os.path.abspath(settings.evaluate.out)), exist_ok=True)
    scoring.write_table(table, settings.evaluate.out)
    verdict = f"; lenses above the run's threshold {threshold:.4g}" if threshold is not None else ""
    print(f"{len(files)} images -> {settings.evaluate.out} ({', '.join(c for c in table if c != 'file')}){verdict}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
