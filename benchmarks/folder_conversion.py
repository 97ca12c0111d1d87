"""Folder conversion: ``python -m platform.data`` on a real-sized DeepLense folder, its speed and its memory.

    python -m benchmarks.folder_conversion [--files 10000] [--side 150]

Writes a Common Test I-shaped folder (``train/`` and ``val/``, each with ``no/``, ``sphere/``,
``vort/``) of ``--files`` float64 ``(1, side, side)`` ``.npy`` files in [0, 1] (10,000 at 150x150:
1.8 GB), then converts it with ``python -m platform.data task=classification data.path=...`` into a
fresh cache, in a process of its own, and records the files/s it reports, its wall time and its
peak resident memory (the kernel's high-water mark for that process). The conversion holds one
shard (``data.shard_size`` images) in memory at a time, so its peak should not grow with the
folder: under 2 GB however many files.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import ROOT, environment, save, table

CLASSES = ("no", "sphere", "vort")


def write_folder(root: str, files: int, side: int) -> int:
    """The folder, 90% of the files in train/ and 10% in val/, classes in turn; its size in bytes."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:side, :side] / side
    total = 0
    for i in range(files):
        split = "val" if i % 10 == 9 else "train"
        folder = os.path.join(root, split, CLASSES[i % 3])
        os.makedirs(folder, exist_ok=True)
        # A smooth ring at a random place, with noise: distinct images that compress like real ones.
        cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.1, 0.25)]
        ring = np.exp(-((np.hypot(x - cx, y - cy) - r) / 0.03) ** 2)
        image = np.clip(ring + rng.normal(0, 0.02, (side, side)), 0, 1)[None]  # (1, H, W) float64
        path = os.path.join(folder, f"{i:06d}.npy")
        np.save(path, image)
        total += os.path.getsize(path)
    return total


def convert(root: str, cache: str) -> dict:
    """``python -m platform.data`` on the folder: wall time, its reported files/s, its peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "platform.data", "task=classification", f"data.path={root}",
                                f"data.cache_dir={cache}"], cwd=ROOT, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"platform.data failed:\n{output[-3000:]}")
    reported = re.search(r"converted (\d+) files in ([\d.]+) s \(([\d.]+) files/s", output)
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "converted_files": int(reported.group(1)),
            "conversion_s": float(reported.group(2)), "files_per_s": float(reported.group(3)), "output": output[-2000:]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--side", type=int, default=150)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "folder_conversion.json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-folder-") as work:
        root = os.path.join(work, "dataset")
        started = time.perf_counter()
        size = write_folder(root, args.files, args.side)
        print(f"wrote {args.files} files, {size / 1e9:.2f} GB, in {time.perf_counter() - started:.0f} s", flush=True)
        measured = convert(root, os.path.join(work, "cache"))
    summary = {"files": args.files, "folder_gb": size / 1e9, **{k: v for k, v in measured.items() if k != "output"}}
    print(table(["files", "folder GB", "files/s", "conversion s", "wall s", "peak RSS MB"],
                [[args.files, summary["folder_gb"], summary["files_per_s"], summary["conversion_s"], summary["wall_s"],
                  summary["peak_rss_mb"]]]))
    print(f"\ntarget: peak RSS under 2048 MB however many files ({summary['peak_rss_mb']:.0f} MB here)")
    result = {"benchmark": "folder_conversion",
              "command": "python -m benchmarks.folder_conversion " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(args), "summary": summary, "output_tail": measured["output"]}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
