"""Readers for the real DeepLense folder layouts.

Substructure classification (Common Test I, Models I-III)::

    <root>/{train,val}/{no,sphere,vort}/*.npy     (1, 150, 150) or (150, 150), float64 in [0, 1]

Class folders go by several names across the DeepLense releases; ``CLASS_ALIASES`` maps
each class to the names it is known by. Every file is opened with
``np.load(allow_pickle=False)``: a data file must never be able to run code.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from platform.data.shards import DataError

CLASS_ALIASES = {
    "no": ("no", "no_sub", "no_substructure", "nosub"),
    "sphere": ("sphere", "subhalo", "subhalos", "cdm", "sph"),
    "vort": ("vort", "vortex", "axion", "vortices"),
}
SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validation", "test")}


def _aliases(name: str) -> tuple[str, ...]:
    for canonical, names in CLASS_ALIASES.items():
        if name in names:
            return (name, *[n for n in names if n != name])
    return (name,)


def _find_dir(root: str, names: tuple[str, ...], what: str) -> str:
    for name in names:
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise DataError(
        f"{root}: no {what} folder (looked for {', '.join(names)}; found {', '.join(present) or 'nothing'})"
    )


def load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: not a readable .npy array ({reason})") from None


def _as_chw(array: np.ndarray, path: str, channels: int) -> np.ndarray:
    if array.ndim == 2 and channels == 1:
        array = array[None]
    if array.ndim != 3 or array.shape[0] != channels or array.dtype.kind not in "fiu":
        raise DataError(
            f"{path}: found shape {array.shape} dtype {array.dtype}; expected ({channels}, H, W)"
            + (" or (H, W)" if channels == 1 else "")
            + " numbers"
        )
    return array.astype(np.float32)


def list_class_files(split_dir: str, classes: list[str]) -> list[tuple[int, list[str]]]:
    """[(label, sorted .npy paths)] for each class folder of one split."""
    found = []
    for label, name in enumerate(classes):
        folder = _find_dir(split_dir, _aliases(name), f"class {name!r}")
        files = sorted(glob.glob(os.path.join(folder, "*.npy")))
        if not files:
            raise DataError(f"{folder}: empty class folder (no .npy files)")
        found.append((label, files))
    return found


def read_split(split_dir: str, classes: list[str], channels: int = 1) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, C, H, W) float32, labels (N,) int64 and source paths of one split folder."""
    images, labels, paths = [], [], []
    shape = None
    for label, files in list_class_files(split_dir, classes):
        for path in files:
            image = _as_chw(load_npy(path), path, channels)  # (C, H, W)
            if shape is None:
                shape = image.shape
            elif image.shape != shape:
                raise DataError(f"{path}: found shape {image.shape}; expected {shape} like the files before it")
            images.append(image)
            labels.append(label)
            paths.append(path)
    return np.stack(images), np.asarray(labels, dtype=np.int64), paths


def split_dirs(root: str) -> dict[str, str]:
    if not os.path.isdir(root):
        raise DataError(f"data.path={root} does not exist or is not a folder")
    return {split: _find_dir(root, names, f"{split} split") for split, names in SPLIT_ALIASES.items()}


def fingerprint(root: str) -> list:
    """What identifies a folder's content cheaply: every file's relative path, size and mtime."""
    entries = []
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            if name.endswith(".npy"):
                stat = os.stat(os.path.join(dirpath, name))
                entries.append([os.path.relpath(os.path.join(dirpath, name), root), stat.st_size, stat.st_mtime_ns])
    return sorted(entries)
