"""Readers for the real DeepLense folder layouts.

Substructure classification (Common Test I, Models I-III), a folder per split holding a
folder per class::

    <root>/{train,val}/{no,sphere,vort}/*.npy     (1, 150, 150) or (150, 150), float64 in [0, 1]

Lens finding (Test II), a folder per split and class side by side::

    <root>/{train,test}_{lenses,nonlenses}/*.npy   (3, 64, 64) float32

The release's held-out split (``val/`` of Common Test I, ``test_*`` of Test II) is the
platform's **test** split; ``platform.data`` carves validation from the training files. A
folder with ``train``, ``val`` and ``test`` is used as it is (``HELD_OUT`` says which names
count as which).

``data.classes`` names the class folders in label order (``[nonlenses, lenses]`` for lens
finding, so a lens is label 1). Class folders go by several names across the DeepLense
releases; ``CLASS_ALIASES`` maps each class to the names it is known by. Every file is
opened with ``np.load(allow_pickle=False)``: a data file must never be able to run code.
"""

from __future__ import annotations

import glob
import math
import os
import tokenize

import numpy as np

from platform.data.shards import DataError

CLASS_ALIASES = {
    "no": ("no", "no_sub", "no_substructure", "nosub"),
    "sphere": ("sphere", "subhalo", "subhalos", "cdm", "sph"),
    "vort": ("vort", "vortex", "axion", "vortices"),
    "lenses": ("lenses", "lens", "lensed"),
    "nonlenses": ("nonlenses", "nonlens", "non_lenses", "unlensed"),
}
SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validation"), "test": ("test", "testing")}
# Pixel values a layout's files hold; "far outside" is more than the range's width beyond it.
VALUE_RANGES = {"nested": (0.0, 1.0), "pairs": (0.0, 1.0), "flat": None}  # Test II's flat layout states none


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


# One image file's pixels; a DeepLense image is well under 1 MB. A header claiming more is refused
# before anything is allocated: numpy would first allocate what the header claims.
MAX_IMAGE_BYTES = 2**30


def load_npy(path: str) -> np.ndarray:
    """The array in one ``.npy`` file, or a one-line ``DataError`` naming it: never unpickled, and
    never an allocation larger than the file (its header is checked against its size first)."""
    try:
        with open(path, "rb") as f:
            start = f.read(8)
            if start.startswith(b"PK\x03\x04"):  # a zip, which np.load would open as an .npz archive
                raise DataError(f"{path}: an .npz archive, not a .npy array; save one image per file with np.save")
            if start.startswith(b"\x93NUMPY"):
                _check_header(f, path)
            f.seek(0)
            array = np.load(f, allow_pickle=False)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError, RecursionError, tokenize.TokenError) as error:
        # SyntaxError, TokenError, RecursionError: numpy reads the header's dict as Python literals
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: not a readable .npy array ({reason})") from None
    return array


def _check_header(f, path: str) -> None:
    """What a .npy header claims (its own length, the array's shape and dtype) against the file's size."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    major, _ = np.lib.format.read_magic(f)
    if major not in (1, 2, 3):
        return  # np.load names the format version it cannot read
    length_bytes = 2 if major == 1 else 4
    header_length = int.from_bytes(f.read(length_bytes), "little")
    if 8 + length_bytes + header_length > size:
        raise DataError(f"{path}: not a readable .npy array (its header claims {header_length} bytes; the file "
                        f"holds {size}): truncated or not written by np.save")
    f.seek(0)
    np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if dtype.hasobject:
        return  # np.load refuses it (allow_pickle=False)
    if any(n < 0 for n in shape):
        raise DataError(f"{path}: not a readable .npy array (its header claims shape {shape}, with a negative size)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > size - f.tell():
        raise DataError(f"{path}: not a readable .npy array (its header claims shape {shape} {dtype}, "
                        f"{nbytes} bytes; the file holds {max(0, size - f.tell())} after it): truncated?")
    if nbytes > MAX_IMAGE_BYTES:
        raise DataError(f"{path}: shape {shape} {dtype}, {nbytes / 2**30:.3g} GiB, more than one image file may hold "
                        f"({MAX_IMAGE_BYTES / 2**30:g} GiB); save one image per file")


def checked_image(array: np.ndarray, path: str, channels: int | None,
                  value_range: tuple[float, float] | None = None) -> np.ndarray:
    """``array`` as float32 (C, H, W), or a one-line error naming ``path`` and what is wrong with it:
    its shape, a non-float dtype, NaN or infinite pixels, a constant image, values far outside
    ``value_range``. Data that cannot be trusted never reaches a loss."""
    if array.ndim == 2:
        array = array[None]
    if (array.ndim != 3 or (channels is not None and array.shape[0] != channels) or array.dtype.kind not in "fiuc"
            or array.size == 0):
        expected = f"({channels}, H, W)" + (" or (H, W)" if channels == 1 else "") if channels else "(C, H, W) or (H, W)"
        raise DataError(f"{path}: found shape {array.shape} dtype {array.dtype}; expected {expected} numbers")
    if array.dtype.kind != "f":
        raise DataError(f"{path}: found dtype {array.dtype}; expected floating-point pixels (float32 or float64): "
                        f"integers or complex numbers are not the intensities a DeepLense image holds")
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        raise DataError(f"{path}: found {nan} NaN and {array.size - int(finite.sum()) - nan} infinite pixels; "
                        f"every pixel must be a finite number")
    low, high = float(array.min()), float(array.max())
    if max(-low, high) > float(np.finfo(np.float32).max):
        raise DataError(f"{path}: pixels from {low:.4g} to {high:.4g}, beyond float32's range (3.4e38) that images "
                        f"are kept in; is it unnormalised?")
    image = array.astype(np.float32)
    if image.min() == image.max():  # in the file, or once in float32 (1e8 + tiny steps)
        kept = "" if low == high else " once in float32, which images are kept in"
        raise DataError(f"{path}: every pixel is {float(image.min()):g}{kept}, a blank image; remove the file")
    if value_range is not None:
        width = value_range[1] - value_range[0]
        if low < value_range[0] - width or high > value_range[1] + width:
            raise DataError(f"{path}: pixels from {low:.4g} to {high:.4g}, far outside this layout's range "
                            f"[{value_range[0]:g}, {value_range[1]:g}]; is it from another dataset or unnormalised?")
    return image


def _npy_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.npy")))
    if not files:
        raise DataError(f"{folder}: empty class folder (no .npy files)")
    return files


def npy_files_below(folder: str, setting: str) -> list[str]:
    """Every ``.npy`` file below ``folder``, in any layout, sorted; or a one-line error naming ``setting``."""
    if not folder or not os.path.isdir(folder):
        raise DataError(f"{setting}={folder} does not exist or is not a folder")
    files = sorted(glob.glob(os.path.join(folder, "**", "*.npy"), recursive=True))
    if not files:
        raise DataError(f"{setting}={folder}: no .npy images in it (or below it)")
    return files


def labelled_files(class_dirs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(label, path) of every .npy file in a split's class folders, in a fixed order."""
    return [(label, path) for label, folder in class_dirs for path in _npy_files(folder)]


def read_files(files: list[tuple[int, str]], channels: int | None = None,
               value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, C, H, W) float32, labels (N,) int64 and source paths of (label, path) files, each
    checked (``checked_image``). ``channels=None`` takes the first file's; every file must then match it.
    """
    chunks = list(file_chunks(files, max(1, len(files)), channels, value_range))
    if not chunks:
        return np.zeros((0, channels or 1, 0, 0), np.float32), np.zeros(0, np.int64), []
    (images, labels, paths), = chunks
    return images, labels, paths


def file_chunks(files: list[tuple[int, str]], rows: int, channels: int | None = None,
                value_range: tuple[float, float] | None = None):
    """``read_files`` ``rows`` files at a time: (images (<= rows, C, H, W), labels, paths) per chunk,
    one progress bar for all. Memory holds one chunk however many files there are."""
    from platform.data.shards import progress

    shape = first = None
    with progress(len(files), f"reading {os.path.dirname(os.path.dirname(files[0][1])) if files else ''}",
                  unit="file") as bar:
        for start in range(0, len(files), rows):
            part = files[start:start + rows]
            images = None
            for i, (label, path) in enumerate(part):
                image = checked_image(load_npy(path), path, channels, value_range)  # (C, H, W)
                if shape is None:
                    shape, first = image.shape, path
                elif image.shape != shape:
                    raise DataError(f"{path}: found shape {image.shape}; expected {shape} like the files before it "
                                    f"(the first: {first})")
                if images is None:  # filled in place: no list of images and a stacked copy at once
                    images = np.empty((len(part), *shape), np.float32)
                images[i] = image
                bar.update()
            yield images, np.asarray([label for label, _ in part], dtype=np.int64), [path for _, path in part]


def class_dirs(root: str, classes: list[str]) -> tuple[dict[str, list[tuple[int, str]]], str]:
    """({split: [(label, class folder)]} for the splits the folder has, its layout) for either
    layout: ``<split>/<class>/`` ("nested") or ``<split>_<class>/`` ("flat")."""
    if not os.path.isdir(root):
        raise DataError(f"data.path={root} does not exist or is not a folder")
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    nested_layout = any(n in present for names in SPLIT_ALIASES.values() for n in names)
    out = {}
    for split, split_names in SPLIT_ALIASES.items():
        nested = next((os.path.join(root, n) for n in split_names if n in present), None)
        flat = [f"{s}_{c}" for s in split_names for c in _aliases(classes[0])]
        if not nested and not any(f in present for f in flat) and split != "train":
            continue  # a held-out split the release does not have: carved from train
        found = []
        for label, name in enumerate(classes):
            if nested:
                folder = _find_dir(nested, _aliases(name), f"class {name!r}")
            else:
                flat = [f"{s}_{c}" for s in split_names for c in _aliases(name)]
                folder = _find_dir(root, tuple(flat), f"{split} split (or {split} class {name!r})")
            found.append((label, folder))
        out[split] = found
    if len(out) == 1:
        raise DataError(f"data.path={root}: only a training split (found {', '.join(present)}); a held-out split "
                        f"is needed for the test numbers: val/ or test/ (or test_<class>/) beside train")
    return out, "nested" if nested_layout else "flat"


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions (sorted) of about ``fraction`` of each class's rows, seeded: the validation rows
    carved from a training split. Every class with two or more rows gives at least one and keeps one."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x76616C]))  # "val"
    picked = []
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        n = min(max(1, round(fraction * len(rows))), len(rows) - 1) if len(rows) >= 2 else 0
        picked.append(rng.permutation(rows)[:n])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def fingerprint(root: str) -> list:
    """What identifies a folder's content cheaply: every file's relative path, size and mtime."""
    entries = []
    for dirpath, _, filenames in os.walk(root):
        for name in sorted(filenames):
            if name.endswith(".npy"):
                try:
                    stat = os.stat(os.path.join(dirpath, name))
                except OSError as error:  # a link to nothing
                    raise DataError(f"{os.path.join(dirpath, name)}: cannot be read ({error.strerror})") from None
                entries.append([os.path.relpath(os.path.join(dirpath, name), root), stat.st_size, stat.st_mtime_ns])
    return sorted(entries)


# Super-resolution pairs: one folder of high-resolution and one of low-resolution images,
# a pair being the two files of one name::
#
#     <root>/HR/*.npy   (H, W) or (1, H, W)
#     <root>/LR/*.npy   (h, w) or (1, h, w)
PAIR_DIRS = ("HR", "LR")


def paired_files(root: str) -> list[tuple[str, str]]:
    """(HR file, LR file) for every name in both HR/ and LR/, sorted; refuses anything unpaired."""
    if not os.path.isdir(root):
        raise DataError(f"data.path={root} does not exist or is not a folder")
    names = {}
    for folder in PAIR_DIRS:
        path = _find_dir(root, (folder, folder.lower()), folder)
        entries = sorted(e for e in os.listdir(path) if not e.startswith("."))  # hidden files are not data
        for entry in entries:
            if not entry.endswith(".npy"):
                raise DataError(f"{os.path.join(path, entry)}: not a .npy file; {folder}/ holds one .npy array "
                                f"per image")
        if not entries:
            raise DataError(f"{path}: no .npy files")
        names[folder] = (path, set(entries))
    (hr_dir, hr), (lr_dir, lr) = names["HR"], names["LR"]
    for here, there, other in ((hr, lr, lr_dir), (lr, hr, hr_dir)):
        lonely = sorted(here - there)
        if lonely:
            raise DataError(f"{root}: {len(lonely)} file(s) without a partner, e.g. {lonely[0]} is not in {other}; "
                            f"a pair is HR/<name>.npy and LR/<name>.npy")
    return [(os.path.join(hr_dir, n), os.path.join(lr_dir, n)) for n in sorted(hr)]


def read_pairs(root: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """HR (N, 1, H, W) and LR (N, 1, h, w) float32 images of a pairs folder, and the pairs' file names."""
    hr_images, lr_images, names = [], [], []
    shapes = {}
    for hr_path, lr_path in paired_files(root):
        for path, images, kind in ((hr_path, hr_images, "HR"), (lr_path, lr_images, "LR")):
            image = checked_image(load_npy(path), path, 1, VALUE_RANGES["pairs"])  # (1, H, W)
            expected = shapes.setdefault(kind, image.shape)
            if image.shape != expected:
                raise DataError(f"{path}: found shape {image.shape}; expected {expected} like the {kind} files "
                                f"before it")
            images.append(image)
        names.append(os.path.basename(hr_path))
    return np.stack(hr_images), np.stack(lr_images), names
