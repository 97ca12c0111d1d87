"""Parquet shards with a manifest: the one on-disk form every dataset takes.

A dataset split is a directory of ``part-00000.parquet``, ... and ``manifest.json``.
Images are stored as raw float32 bytes with their (C, H, W) beside them, so Ray Data
reads them as plain columns and ``decode_images`` turns a batch back into one array
without a copy per image. A directory is written under a temporary name and renamed
into place, so an interrupted write never leaves a half dataset that looks complete.

A split may also live on object storage (``s3://``, ``gs://``, any URI pyarrow knows):
it is written locally, uploaded, and its manifest goes up last, so there too a split
without a manifest is never taken for a complete one. Ray Data streams the parts from
wherever they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# 2: each file's sha256 in the manifest, checked when a local cache is reused (a version-1 cache is built again)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Bad or missing data: the message is one line naming the file and what is wrong."""


PROGRESS_MIN_ROWS = 1000  # data work on fewer rows takes seconds: no bar


def progress(total: int, desc: str, unit: str = "img"):
    """A progress bar on stderr (rate and time left) for data work that takes a while."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=2.0, dynamic_ncols=True,
                disable=total < PROGRESS_MIN_ROWS)


@dataclass(frozen=True)
class Shards:
    path: str  # directory holding part-*.parquet and manifest.json
    manifest: dict

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    @property
    def image_shape(self) -> tuple:
        return tuple(self.manifest["image_shape"])

    @property
    def files(self) -> list[str]:
        return [join(self.path, f["name"]) for f in self.manifest["files"]]


def is_uri(path: str) -> bool:
    return "://" in path


def join(path: str, *names: str) -> str:
    return "/".join([path.rstrip("/"), *names]) if is_uri(path) else os.path.join(path, *names)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``path`` (a local path or a URI) and the path inside it."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
        raise DataError(f"{path}: cannot open this storage ({' '.join(str(error).split())})") from None


def exists(path: str) -> bool:
    fs, inner = _filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


ROW_GROUP = 256  # rows per Parquet row group: what a reader holds at once of a shard


def write(path: str, images: np.ndarray, columns: dict[str, np.ndarray], manifest: dict, shard_size: int) -> Shards:
    """Write ``images`` (N, C, H, W) and per-image ``columns`` as Parquet shards at ``path``.

    A column of shape (N, C', H', W') is a second image per row (a low-resolution copy, say):
    stored like ``image``, with its own ``<name>_channels``, ``<name>_height``, ``<name>_width``.
    """
    n = len(images)
    chunks = ((images[start:start + shard_size], {k: np.asarray(v)[start:start + shard_size] for k, v in columns.items()})
              for start in range(0, n, shard_size))
    return write_chunks(path, chunks if n else iter([(images, columns)]), manifest)


def write_chunks(path: str, chunks, manifest: dict) -> Shards:
    """``write`` from an iterable of (images (rows, C, H, W), {column: values}), one shard each: a
    folder of any size converted with one shard in memory at a time."""
    digest = hashlib.sha256()
    if is_uri(path):
        staging = tempfile.mkdtemp(prefix="deeplense-upload-")
    else:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".writing-", dir=parent)
    files, n, shape, names, image_shapes = [], 0, None, [], {}
    try:
        for index, (chunk, columns) in enumerate(chunks):
            chunk = np.ascontiguousarray(chunk, dtype=np.float32)  # (rows, C, H, W)
            shape = shape or list(chunk.shape[1:])
            image_columns = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in columns.items() if np.ndim(v) == 4}
            columns = {k: np.asarray(v) for k, v in columns.items() if k not in image_columns}
            names, image_shapes = sorted(columns), {k: list(v.shape[1:]) for k, v in sorted(image_columns.items())}
            if not len(chunk):
                continue
            table = _image_column(chunk)
            for name, values in image_columns.items():
                table.update(_image_column(values, name + "_"))
                table[name] = table.pop(name + "_image")
            for name, values in columns.items():
                table[name] = pa.array(values)
            name = f"part-{index:05d}.parquet"
            # Images: no dictionary (Parquet would first hash every image's bytes, a second copy of
            # the shard, to find none repeated); row groups of ROW_GROUP rows, read one at a time.
            pq.write_table(pa.table(table), os.path.join(staging, name), row_group_size=ROW_GROUP,
                           use_dictionary=[k for k, v in table.items() if v.type != pa.binary()])
            digest.update(memoryview(chunk).cast("B"))  # the bytes themselves, not a copy of them
            for key in sorted(image_columns):
                digest.update(memoryview(image_columns[key]).cast("B"))
            for key in sorted(columns):
                digest.update(np.ascontiguousarray(columns[key]).tobytes())
            files.append({"name": name, "rows": len(chunk), "bytes": os.path.getsize(os.path.join(staging, name)),
                          "sha256": file_sha256(os.path.join(staging, name))})
            n += len(chunk)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a half-written split never stands in for the old one
        raise
    manifest = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "num_rows": n,
        "image_shape": shape or [],
        "columns": names,
        **({"image_columns": image_shapes} if image_shapes else {}),
        "files": files,
        "content_hash": digest.hexdigest(),
    }
    if is_uri(path):
        _upload(staging, path, manifest)
        return Shards(path, manifest)
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(staging, path)
    return Shards(path, manifest)


def _image_column(chunk: np.ndarray, prefix: str = "") -> dict[str, pa.Array]:
    rows, c, h, w = chunk.shape  # (rows, C, H, W), C-contiguous float32
    # Each row's bytes, as a view of the chunk itself (no copy per image, no second copy in pyarrow).
    offsets = pa.py_buffer(np.arange(rows + 1, dtype=np.int32) * (c * h * w * 4))
    images = pa.Array.from_buffers(pa.binary(), rows, [None, offsets, pa.py_buffer(chunk)])
    return {
        prefix + "image": images,
        prefix + "channels": pa.array(np.full(rows, c, np.int32)),
        prefix + "height": pa.array(np.full(rows, h, np.int32)),
        prefix + "width": pa.array(np.full(rows, w, np.int32)),
    }


def _upload(staging: str, uri: str, manifest: dict) -> None:
    fs, root = _filesystem(uri)
    try:
        fs.delete_dir_contents(root, missing_dir_ok=True)  # the old manifest goes first
        fs.create_dir(root)
        for f in manifest["files"]:
            pafs.copy_files(os.path.join(staging, f["name"]), f"{root}/{f['name']}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        with fs.open_output_stream(f"{root}/{MANIFEST}") as out:
            out.write(json.dumps(manifest, indent=2).encode())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_shards(path: str) -> Shards:
    manifest_path = join(path, MANIFEST)
    fs, inner = _filesystem(manifest_path)
    try:
        with fs.open_input_stream(inner) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(f"{path}: no {MANIFEST}; not a dataset written by the platform") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{manifest_path}: unreadable manifest ({error})") from None
    return Shards(path, manifest)


def file_sha256(path: str) -> str:
    """The sha256 of a local file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def reuse(path: str, expected: dict) -> Shards | None:
    """The shards at ``path`` if their manifest records ``expected`` and every file is intact: its size,
    and on local disk its sha256. A damaged cache is named in one line on stderr, and the caller
    builds it again.

    The per-file sha256 is of the Parquet bytes, checked at the speed of reading the files once
    (the manifest's ``content_hash`` is of the decoded arrays: checking it would decode every
    row). Object storage keeps checksums of its own, and reading a remote split back on every
    command would download it: there the sizes are checked.
    """
    try:
        shards = open_shards(path)
    except DataError:
        return None
    manifest = shards.manifest
    if manifest.get("format_version") != FORMAT_VERSION:
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    fs, root = _filesystem(path)
    infos = fs.get_file_info([f"{root}/{f['name']}" for f in manifest["files"]])
    for info, f in zip(infos, manifest["files"]):
        if info.type != pafs.FileType.File:
            return _corrupted(path, f"{f['name']}: missing")
        if info.size != f["bytes"]:
            return _corrupted(path, f"{f['name']}: {info.size} bytes, {f['bytes']} when written")
    if not is_uri(path):
        for f in manifest["files"]:
            if file_sha256(os.path.join(path, f["name"])) != f.get("sha256"):
                return _corrupted(path, f"{f['name']}: content hash differs")
    return shards


def _corrupted(path: str, what: str) -> None:
    print(f"cached data at {path} is corrupted ({what}); rebuilding it", file=sys.stderr, flush=True)
    return None


def read(shards: Shards) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All rows of a split in memory: (N, C, H, W) images and the other columns (for previews and tests)."""
    batch = head(shards, shards.num_rows) if len(shards.files) == 1 else _all_rows(shards)
    image_columns = list(shards.manifest.get("image_columns", {}))
    stored = {f"{p}{k}" for p in ["", *(c + "_" for c in image_columns)] for k in ("image", "channels", "height", "width")}
    plain = {k: v for k, v in batch.items() if k not in stored and k not in image_columns}
    return decode_images(batch), {**plain, **{c: decode_images(batch, c) for c in image_columns}}


def in_memory(shards: Shards) -> dict[str, np.ndarray]:
    """Every row of a split as columns of one array each, images decoded to (N, C, H, W) float32:
    the form a worker slices batches from when the split is held in Ray's object store."""
    images, columns = read(shards)
    return {"image": images, **columns}


def _all_rows(shards: Shards) -> dict[str, np.ndarray]:
    table = pa.concat_tables([pq.read_table(f) for f in shards.files])
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def head(shards: Shards, rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` rows as a numpy batch, in the form Ray Data hands to ``collate``."""
    tables, count = [], 0
    for path in shards.files:  # usually the first file holds them all
        tables.append(pq.read_table(path).slice(0, rows - count))
        count += tables[-1].num_rows
        if count >= rows:
            break
    table = pa.concat_tables(tables)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def schema(shards: Shards) -> pa.Schema | None:
    """The columns and their types, from the first shard's footer (None for a split with no rows)."""
    if not shards.files:
        return None
    fs, where = _filesystem(shards.files[0])
    with fs.open_input_file(where) as f:
        return pq.read_schema(f)


def batches(shards: Shards, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every row in order, as numpy batches of at most ``batch_size`` rows in the form ``head`` gives."""
    for path in shards.files:  # a row group at a time, local or on object storage
        fs, where = _filesystem(path)
        with fs.open_input_file(where) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                yield {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in record_batch.schema.names}


def decode_images(batch: dict, column: str = "image") -> np.ndarray:
    """An image column of a numpy batch (``image`` or a second one) as one float32 array (B, C, H, W).

    A batch of rows held in memory (``in_memory``) has it decoded already: returned as it is.
    """
    images = batch[column]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images
    prefix = "" if column == "image" else column + "_"
    c, h, w = (int(batch[prefix + k][0]) for k in ("channels", "height", "width"))
    return np.frombuffer(b"".join(images), dtype=np.float32).reshape(len(images), c, h, w)
