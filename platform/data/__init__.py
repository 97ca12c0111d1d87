"""Datasets: simulated or real DeepLense images, always materialised as Parquet shards.

``substructure(cfg)`` is what a task's ``build_data`` calls: it returns the train and
val splits as ``Shards``, simulating them on first use from ``(preset, size, seed)`` or
converting a real DeepLense folder, and reusing earlier shards whose manifest matches.
It runs on the driver before any Ray work, so a missing path or a corrupt file is
reported before a cluster is touched. Training workers then stream the shards through
Ray Data, from local disk or object storage alike.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from platform import config as config_lib
from platform.data import folders
from platform.data import shards as shards_lib
from platform.data.shards import DataError, Shards, decode_images, open_shards, reuse, write

__all__ = ["DataError", "Shards", "cached_simulation", "decode_images", "from_folder", "from_pairs", "simulated",
           "split_seed", "substructure"]

SPLITS = ("train", "val")


def split_seed(seed: int, split: str) -> int:
    # Independent streams per split: val images are never a prefix of train images.
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def cached_simulation(name: str, params: dict, make, classes: list[str], root: str, shard_size: int) -> Shards:
    """Shards of ``make()`` -> (images, truth with "label"), made once per ``params`` and reused after.

    ``params`` must fix the output entirely (sizes, seeds, simulator version): it is the
    manifest's identity and, hashed, the folder's name.
    """
    expected = {"source": "sim", "simulation": name, **params}
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:12]
    path = shards_lib.join(root, "sim", f"{name}-n{params.get('num_rows', 0)}-{key}")
    shards = reuse(path, expected)
    if shards is None:
        images, truth = make()
        counts = np.bincount(truth["label"], minlength=len(classes)).tolist()
        shards = write(path, images, truth, {**expected, "classes": list(classes), "counts": counts}, shard_size)
    return shards


def simulated(preset: str, num_rows: int, seed: int, root: str, shard_size: int) -> Shards:
    from platform.data import simulate

    if preset not in simulate.PRESETS:
        raise DataError(f"data.preset={preset} is not a simulator preset; expected one of {', '.join(simulate.PRESETS)}")
    params = {"preset": preset, "seed": seed, "num_rows": num_rows, "simulator_version": simulate.SIMULATOR_VERSION}
    return cached_simulation(preset, params, lambda: simulate.simulate(preset, num_rows, seed),
                             list(simulate.CLASS_NAMES), root, shard_size)


def from_folder(path: str, classes: list[str], root: str, shard_size: int) -> dict[str, Shards]:
    """The splits of a real DeepLense folder (converted once), or of a folder of platform shards."""
    if all(shards_lib.exists(shards_lib.join(path, split, shards_lib.MANIFEST)) for split in SPLITS):
        return {split: open_shards(shards_lib.join(path, split)) for split in SPLITS}
    if shards_lib.is_uri(path):
        raise DataError(f"data.path={path}: no platform shards there (train/ and val/ with {shards_lib.MANIFEST}); "
                        f"DeepLense .npy folders are read from local disk")
    splits = folders.class_dirs(path, classes)
    key = hashlib.sha256(json.dumps([folders.fingerprint(path), classes]).encode()).hexdigest()
    out = {}
    for split, class_dirs in splits.items():
        expected = {"source": "folder", "origin": os.path.abspath(path), "split": split, "fingerprint": key}
        target = os.path.join(root, "folders", f"{os.path.basename(os.path.abspath(path))}-{key[:12]}", split)
        shards = reuse(target, expected)
        if shards is None:
            images, labels, _ = folders.read_split(class_dirs)
            counts = np.bincount(labels, minlength=len(classes)).tolist()
            manifest = {**expected, "classes": list(classes), "counts": counts}
            shards = write(target, images, {"label": labels}, manifest, shard_size)
        out[split] = shards
    return out


def substructure(cfg) -> dict[str, Shards]:
    """Train and val splits for the three-class substructure tasks (no / sphere / vort)."""
    data, root = cfg.data, config_lib.cache_dir(cfg)
    if data.source == "folder" or data.path:  # a path means real data, whatever the source says
        if not data.path:
            raise DataError("data.source=folder needs data.path=/path/to/deeplense/folder")
        splits = from_folder(os.path.expanduser(data.path), list(data.classes), root, data.shard_size)
    else:
        sizes = {"train": data.num_train, "val": data.num_val}
        splits = {split: simulated(data.preset, sizes[split], split_seed(data.seed, split), root, data.shard_size)
                  for split in SPLITS}
    check_classes(splits, list(data.classes))
    return splits


def check_classes(splits: dict[str, Shards], classes: list[str]) -> None:
    # The model's outputs and the metric names follow data.classes; labels must agree with them.
    for split, shards in splits.items():
        found = shards.manifest.get("classes")
        if found is not None and list(found) != classes:
            raise DataError(f"data.classes=[{','.join(classes)}] but the {split} data at {shards.path} has classes "
                            f"[{','.join(found)}]; set data.classes=[{','.join(found)}]")


def from_pairs(path: str, root: str, shard_size: int, val_fraction: float, seed: int) -> dict[str, Shards]:
    """The splits of a folder of HR/LR pairs (see ``folders.paired_files``), or of platform shards.

    Converted once: HR is the ``image`` column, LR the second image column ``lr``. A seeded
    permutation holds out ``val_fraction`` of the pairs (at least one, never all) for
    validation. The HR values' range goes into the manifest, so a task can check it.
    """
    if all(shards_lib.exists(shards_lib.join(path, split, shards_lib.MANIFEST)) for split in SPLITS):
        return {split: open_shards(shards_lib.join(path, split)) for split in SPLITS}
    if shards_lib.is_uri(path):
        raise DataError(f"data.path={path}: no platform shards there (train/ and val/ with {shards_lib.MANIFEST}); "
                        f"HR/ LR/ .npy folders are read from local disk")
    pairs = folders.paired_files(path)  # every name checked before a file is read
    key = hashlib.sha256(json.dumps([folders.fingerprint(path), val_fraction, seed]).encode()).hexdigest()
    folder = os.path.join(root, "pairs", f"{os.path.basename(os.path.abspath(path))}-{key[:12]}")
    expected = {split: {"source": "pairs", "origin": os.path.abspath(path), "split": split, "fingerprint": key}
                for split in SPLITS}
    found = {split: reuse(os.path.join(folder, split), expected[split]) for split in SPLITS}
    if all(found.values()):
        return found
    if len(pairs) < 2:
        raise DataError(f"data.path={path}: {len(pairs)} pair(s); a train and a val split need at least 2")
    hr, lr, _ = folders.read_pairs(path)  # (N, 1, H, W), (N, 1, h, w)
    n_val = min(max(1, round(val_fraction * len(hr))), len(hr) - 1)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x70616972])).permutation(len(hr))  # "pair"
    rows = {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
    value_range = [float(hr.min()), float(hr.max())]
    return {split: write(os.path.join(folder, split), hr[rows[split]], {"lr": lr[rows[split]]},
                         {**expected[split], "value_range": value_range}, shard_size)
            for split in SPLITS}
