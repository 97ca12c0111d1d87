"""Datasets: simulated or real DeepLense images, always materialised as Parquet shards.

``substructure(cfg)`` is what a task's ``build_data`` calls: it returns the train, val and
test splits as ``Shards``, simulating them on first use from ``(preset, size, seed)`` or
converting a real DeepLense folder, and reusing earlier shards whose manifest matches. The
search and every choice a run makes see ``val`` only; ``test`` is scored once, for the model
that is kept.
It runs on the driver before any Ray work, so a missing path or a corrupt file is
reported before a cluster is touched. Training workers then stream the shards through
Ray Data, from local disk or object storage alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from platform import config as config_lib
from platform.data import folders
from platform.data import shards as shards_lib
from platform.data.shards import DataError, Shards, decode_images, open_shards, reuse, write, write_chunks

__all__ = ["DataError", "SPLITS", "Shards", "cached_simulation", "decode_images", "from_folder", "from_pairs",
           "simulated", "split_seed", "split_sizes", "substructure"]

SPLITS = ("train", "val", "test")
FILE_COLUMN = "file"  # real data: each row's source file, relative to data.path (the split lists of a run)


def split_sizes(data_cfg) -> dict[str, int]:
    """Rows of each simulated split: ``data.num_test`` defaults to ``data.num_val``."""
    return {"train": data_cfg.num_train, "val": data_cfg.num_val, "test": data_cfg.num_test or data_cfg.num_val}


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


def from_folder(path: str, classes: list[str], root: str, shard_size: int, val_fraction: float = 0.1,
                seed: int = 0) -> dict[str, Shards]:
    """The train, val and test splits of a real DeepLense folder (converted once), or of platform shards.

    The release's held-out split is ``test``; ``val`` is carved from the training files
    (``val_fraction`` of each class, seeded) unless the folder has both ``val`` and ``test``.
    """
    if all(shards_lib.exists(shards_lib.join(path, split, shards_lib.MANIFEST)) for split in SPLITS):
        return {split: open_shards(shards_lib.join(path, split)) for split in SPLITS}
    if shards_lib.is_uri(path):
        raise DataError(f"data.path={path}: no platform shards there (train/, val/ and test/ with "
                        f"{shards_lib.MANIFEST}); DeepLense .npy folders are read from local disk")
    dirs, layout = folders.class_dirs(path, classes)
    carve = "test" not in dirs or "val" not in dirs
    key = hashlib.sha256(json.dumps([folders.fingerprint(path), classes, carve and [val_fraction, seed]])
                         .encode()).hexdigest()
    folder = os.path.join(root, "folders", f"{os.path.basename(os.path.abspath(path))}-{key[:12]}")
    expected = {split: {"source": "folder", "origin": os.path.abspath(path), "split": split, "fingerprint": key}
                for split in SPLITS}
    found = {split: reuse(os.path.join(folder, split), expected[split]) for split in SPLITS}
    if not all(found.values()):
        files = {split: folders.labelled_files(d) for split, d in dirs.items()}
        if carve:  # the one held-out split is the test split; validation comes from train
            files["test"] = files.pop("val", None) or files["test"]
            labels = np.array([label for label, _ in files["train"]])
            picked = set(folders.stratified_split(labels, val_fraction, seed).tolist())
            files["val"] = [f for i, f in enumerate(files["train"]) if i in picked]
            files["train"] = [f for i, f in enumerate(files["train"]) if i not in picked]
        # Every file checked before anything is written, then one split at a time; one shard of
        # images in memory at a time, however many files (a real release has tens of thousands).
        value_range, started, digests = folders.VALUE_RANGES[layout], time.perf_counter(), {}
        for split in SPLITS:
            digests[split] = set()
            for images, _, _ in folders.file_chunks(files[split], shard_size, value_range=value_range):
                digests[split] |= image_digests(images)
        for split in SPLITS:
            labels = np.array([label for label, _ in files[split]], dtype=np.int64)
            manifest = {**expected[split], "classes": list(classes),
                        "counts": np.bincount(labels, minlength=len(classes)).tolist(),
                        "shared_images": shared_with_earlier(split, digests)}
            chunks = ((images, {"label": chunk_labels, FILE_COLUMN: np.array([os.path.relpath(p, path) for p in paths])})
                      for images, chunk_labels, paths in folders.file_chunks(files[split], shard_size, value_range=value_range))
            found[split] = write_chunks(os.path.join(folder, split), chunks, manifest)
        total = sum(len(f) for f in files.values())
        seconds = time.perf_counter() - started
        print(f"converted {total} files in {seconds:.1f} s ({total / seconds:.0f} files/s, each read twice: checked, "
              f"then written)", flush=True)
    warn_shared(found)
    return found


def unlabelled(path: str, like: Shards, root: str, shard_size: int) -> Shards:
    """Shards of every ``.npy`` image below ``path`` (a target domain's, for ``adapt.path``), each file
    checked as a class folder's are and of the training images' shape (``like``); converted once,
    reused while the folder's files are unchanged. No labels are read or written."""
    files = folders.npy_files_below(path, "adapt.path")
    shape = list(like.image_shape)
    key = hashlib.sha256(json.dumps([folders.fingerprint(path), shape]).encode()).hexdigest()
    folder = os.path.join(root, "folders", f"adapt-{os.path.basename(os.path.abspath(path))}-{key[:12]}")
    expected = {"source": "folder", "origin": os.path.abspath(path), "split": "adapt", "fingerprint": key}
    found = reuse(folder, expected)
    if found is not None:
        return found

    def chunks():
        for images, _, paths in folders.file_chunks([(0, f) for f in files], shard_size, channels=shape[0]):
            if list(images.shape[1:]) != shape:
                raise DataError(f"adapt.path: {paths[0]} has shape {tuple(images.shape[1:])}; expected "
                                f"{tuple(shape)}, the training images' shape")
            yield images, {FILE_COLUMN: np.array([os.path.relpath(p, path) for p in paths])}

    return write_chunks(folder, chunks(), {**expected, "classes": [], "counts": []})


def image_digests(images: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest() for x in images}


def shared_with_earlier(split: str, digests: dict[str, set]) -> dict[str, int]:
    """{earlier split: images of ``split`` with the same pixels as one there}, where any are shared."""
    earlier = SPLITS[:SPLITS.index(split)]
    return {other: len(digests[split] & digests[other]) for other in earlier
            if other in digests and digests[split] & digests[other]}


def warn_shared(splits: dict[str, Shards]) -> None:
    """A warning for every pair of splits that share images (the same pixels): a test image also in
    train makes the test numbers optimistic."""
    for split, shards in splits.items():
        for other, count in shards.manifest.get("shared_images", {}).items():
            print(f"warning: {count} image(s) of the {split} split are also in the {other} split (the same pixels); "
                  f"its numbers are optimistic by that much: remove the duplicates from {shards.manifest.get('origin')}",
                  file=sys.stderr, flush=True)


def substructure(cfg) -> dict[str, Shards]:
    """Train, val and test splits for the three-class substructure tasks (no / sphere / vort)."""
    data, root = cfg.data, config_lib.cache_dir(cfg)
    if data.source == "folder" or data.path:  # a path means real data, whatever the source says
        if not data.path:
            raise DataError("data.source=folder needs data.path=/path/to/deeplense/folder")
        splits = from_folder(os.path.expanduser(data.path), list(data.classes), root, data.shard_size,
                             data.val_fraction, data.seed)
    else:
        sizes = split_sizes(data)
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


def from_pairs(path: str, root: str, shard_size: int, val_fraction: float, test_fraction: float,
               seed: int) -> dict[str, Shards]:
    """The splits of a folder of HR/LR pairs (see ``folders.paired_files``), or of platform shards.

    Converted once: HR is the ``image`` column, LR the second image column ``lr``. A seeded
    permutation holds out ``test_fraction`` of the pairs for the test split and
    ``val_fraction`` of the rest for validation (each at least one). The HR values' range goes
    into the manifest, so a task can check it.
    """
    if all(shards_lib.exists(shards_lib.join(path, split, shards_lib.MANIFEST)) for split in SPLITS):
        return {split: open_shards(shards_lib.join(path, split)) for split in SPLITS}
    if shards_lib.is_uri(path):
        raise DataError(f"data.path={path}: no platform shards there (train/, val/ and test/ with "
                        f"{shards_lib.MANIFEST}); HR/ LR/ .npy folders are read from local disk")
    pairs = folders.paired_files(path)  # every name checked before a file is read
    key = hashlib.sha256(json.dumps([folders.fingerprint(path), val_fraction, test_fraction, seed])
                         .encode()).hexdigest()
    folder = os.path.join(root, "pairs", f"{os.path.basename(os.path.abspath(path))}-{key[:12]}")
    expected = {split: {"source": "pairs", "origin": os.path.abspath(path), "split": split, "fingerprint": key}
                for split in SPLITS}
    found = {split: reuse(os.path.join(folder, split), expected[split]) for split in SPLITS}
    if all(found.values()):
        warn_shared(found)
        return found
    if len(pairs) < 3:
        raise DataError(f"data.path={path}: {len(pairs)} pair(s); a train, a val and a test split need at least 3")
    hr, lr, names = folders.read_pairs(path)  # (N, 1, H, W), (N, 1, h, w)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x70616972])).permutation(len(hr))  # "pair"
    n_test = min(max(1, round(test_fraction * len(hr))), len(hr) - 2)
    n_val = min(max(1, round(val_fraction * (len(hr) - n_test))), len(hr) - n_test - 1)
    rows = {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}
    digests = {split: image_digests(hr[rows[split]]) for split in SPLITS}
    value_range = [float(hr.min()), float(hr.max())]
    found = {split: write(os.path.join(folder, split), hr[rows[split]],
                          {"lr": lr[rows[split]], FILE_COLUMN: np.asarray(names)[rows[split]]},
                          {**expected[split], "value_range": value_range,
                           "shared_images": shared_with_earlier(split, digests)}, shard_size)
             for split in SPLITS}
    warn_shared(found)
    return found
