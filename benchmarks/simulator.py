"""Simulator throughput: images/s of the built-in lensing simulator at 64x64 and 150x150.

    python -m benchmarks.simulator [--images 512] [--repeats 5] [--out benchmarks/results/simulator.json]

Both presets draw 25 subhaloes per image (the presets' default). Sizes are interleaved in
each repetition and the median is reported, so a busy moment of a shared machine hits both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks.common import ROOT, save
from platform.data import simulate as simulator
from platform.data.simulate import simulate

# (name in the table, preset): model_ii renders 64x64, model_i 150x150.
SIZES = [("64x64", "model_ii"), ("150x150", "model_i")]


def images_per_second(preset: str, images: int, seed: int) -> float:
    started = time.perf_counter()
    simulate(preset, images, seed)
    return images / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "simulator.json"))
    args = parser.parse_args(argv)

    for _, preset in SIZES:
        simulate(preset, 8, seed=0)  # first-call costs (allocations, kernels) out of the figures
    rates = {name: [] for name, _ in SIZES}
    for repeat in range(args.repeats):
        for name, preset in SIZES:
            rates[name].append(images_per_second(preset, args.images, seed=1 + repeat))

    result = {
        "benchmark": "simulator",
        "command": "python -m benchmarks.simulator " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "images_per_repeat": args.images,
        "repeats": args.repeats,
        "sizes": {name: {"preset": preset, "n_pix": simulator.get_preset(preset).n_pix,
                         "subhalos": list(simulator.get_preset(preset).n_subhalos),
                         "median_images_per_s": statistics.median(rates[name]),
                         "images_per_s": rates[name]} for name, preset in SIZES},
    }
    print(f"{'size':>9} {'preset':>9} {'subhalos':>9} {'images/s (median)':>18}")
    for name, row in result["sizes"].items():
        print(f"{name:>9} {row['preset']:>9} {str(tuple(row['subhalos'])):>9} {row['median_images_per_s']:>18.0f}")
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
