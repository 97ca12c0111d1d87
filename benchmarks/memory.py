"""Memory: peak resident memory of the sweep's driver and of a training worker, and proof that a
worker does not hold its own copy of the dataset.

    python -m benchmarks.memory [--sweep-args ...] [--share-rows 8192] [--parts sweep workers]

1. The default ``python -m platform.tune task=mae`` (its own search space and sizes), sampled
   every ``--interval`` s: peak RSS and peak USS (memory no other process shares) of the driver,
   of each kind of Ray process (a trial's function, the Train controller, the Train worker, ...).
2. ``python -m platform.train task=mae`` with two workers on this node, over ``--small-rows`` (256) and over
   ``--share-rows`` images: the split sits once in Ray's shared object store, so a worker's USS
   grows far less than the dataset, while its RSS counts the shared pages it reads. Both runs go
   to one Ray head the benchmark starts (``ray start --head``): a worker's memory is the same
   whoever started the head, and one start is half a minute less on two cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

from benchmarks.common import ROOT, environment, save, start_head, stop_head, table


def kind(process: psutil.Process, driver: int) -> str | None:
    if process.pid == driver:
        return "driver"
    try:
        title = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    if not title.startswith("ray::"):
        return None
    name = title[5:].split()[0]
    return "Ray idle worker" if name in ("IDLE", "") else name.split(".")[0]


def sample(args: list[str], cwd: str, interval: float, head: dict | None = None) -> dict:
    """Run a command; peak RSS and USS in MB per kind of process (the largest single process of each
    kind), and the peak of all its processes' USS summed. With ``head`` (``start_head``), the
    command runs on that Ray head, and the head's processes count as the command's."""
    peaks: dict[str, dict] = {}
    rss_read: dict[int, tuple[float, float]] = {}  # pid -> (RSS, USS) in MB at its last USS reading
    env = environment(**({"RAY_ADDRESS": head["address"]} if head else {}))
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    import threading

    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        try:  # the command's own processes: its local Ray (raylet, workers) descends from it, or from the head
            mine = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            if head:
                mine += psutil.Process(head["pid"]).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        total = 0.0
        for p in mine:
            try:
                rss = p.memory_info().rss / 2**20
                # USS costs a walk of the page tables (20 ms for a 1 GB worker), RSS almost nothing: USS is
                # read again at each new high of the process's RSS, as its private pages are resident
                # pages (only pages another process stops sharing turn private without one).
                if rss > rss_read.get(p.pid, (-1.0, 0.0))[0]:
                    rss_read[p.pid] = (rss, p.memory_full_info().uss / 2**20)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            uss = rss_read[p.pid][1]
            total += uss
            name = kind(p, process.pid)
            if name is None:
                continue
            peak = peaks.setdefault(name, {"rss_mb": 0.0, "uss_mb": 0.0, "pids": set()})
            peak["rss_mb"] = max(peak["rss_mb"], rss)
            peak["uss_mb"] = max(peak["uss_mb"], uss)
            peak["pids"].add(p.pid)
        # Everything the command runs (Ray's own servers too), each page counted once.
        everything = peaks.setdefault("all processes (USS summed)", {"rss_mb": None, "uss_mb": 0.0, "pids": set()})
        everything["uss_mb"] = max(everything["uss_mb"], total)
        everything["pids"].update(p.pid for p in mine)
        time.sleep(interval)
    reader.join(5)
    if process.returncode:
        sys.stderr.write("".join(output)[-4000:])
        raise SystemExit(f"benchmark command failed ({process.returncode}): {' '.join(args)}")
    return {name: {"rss_mb": p["rss_mb"], "uss_mb": p["uss_mb"], "processes": len(p["pids"])}
            for name, p in sorted(peaks.items())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-args", nargs="*", default=[], help="extra key=value for the sweep (tests: tiny sizes)")
    parser.add_argument("--train-args", nargs="*", default=[], help="extra key=value for the two-worker runs (tests: tiny sizes)")
    parser.add_argument("--small-rows", type=int, default=256)
    parser.add_argument("--share-rows", type=int, default=8192)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--parts", nargs="+", choices=["sweep", "workers"], default=["sweep", "workers"],
                        help="1. the sweep's processes, 2. the two-worker runs (default: both)")
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "results", "cache"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "memory.json"))
    args = parser.parse_args(argv)

    result = {"benchmark": "memory",
              "command": "python -m benchmarks.memory " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as workdir:
        db = f"mlflow.tracking_uri=sqlite:///{os.path.join(workdir, 'mlflow.db')}"
        if "sweep" in args.parts:
            result["sweep"] = sample([sys.executable, "-m", "platform.tune", "task=mae", f"data.cache_dir={args.cache}",
                                      db, "mlflow.register_model=false", *args.sweep_args], workdir, args.interval)
            print(table(["task=mae sweep", "peak RSS MB", "peak USS MB", "processes"],
                        [[name, p["rss_mb"], p["uss_mb"], p["processes"]] for name, p in result["sweep"].items()]))
        if "workers" in args.parts:
            result.update(two_workers(args, workdir, db))
    save(result, args.out)
    return result


def two_workers(args, workdir: str, db: str) -> dict:
    """Part 2: a Train worker's peak RSS and USS with a small and with a large training split."""
    from platform import config as config_lib, registry

    shared, dataset_mb = {}, {}
    folder = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths stay under 108 bytes
    head = start_head(folder, environment())
    try:
        for rows in (args.small_rows, args.share_rows):  # the worker's own memory, with a small and a large dataset
            cfg = config_lib.build("mae", [{"data.num_train": rows, "data.num_val": 64, "data.cache_dir": args.cache}])
            shards = registry.get("mae").build_data(cfg)
            dataset_mb[rows] = sum(f["bytes"] for f in shards["train"].manifest["files"]) / 2**20
            shared[rows] = sample([sys.executable, "-m", "platform.train", "task=mae", f"data.num_train={rows}",
                                   "data.num_val=64", f"data.cache_dir={args.cache}", "train.epochs=1",
                                   "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", db,
                                   "mlflow.register_model=false", *args.train_args], workdir, args.interval, head)
    finally:
        stop_head(head)
        shutil.rmtree(folder, ignore_errors=True)
    small, large = (shared[r]["RayTrainWorker"] for r in (args.small_rows, args.share_rows))
    growth = {"dataset_mb": dataset_mb[args.share_rows] - dataset_mb[args.small_rows],
              "worker_rss_mb": large["rss_mb"] - small["rss_mb"], "worker_uss_mb": large["uss_mb"] - small["uss_mb"]}
    print()
    print(table(["2 workers on one node", f"{args.small_rows} images", f"{args.share_rows} images", "growth"], [
        ["training split on disk, MB", dataset_mb[args.small_rows], dataset_mb[args.share_rows], growth["dataset_mb"]],
        ["a worker's peak RSS, MB (shared pages included)", small["rss_mb"], large["rss_mb"], growth["worker_rss_mb"]],
        ["a worker's peak USS, MB (its own memory)", small["uss_mb"], large["uss_mb"], growth["worker_uss_mb"]],
    ]))
    print(f"\na worker's own memory grew {growth['worker_uss_mb']:.0f} MB for {growth['dataset_mb']:.0f} MB more data: "
          f"the split is not copied into each worker")
    return {"two_workers": {str(r): v for r, v in shared.items()},
            "dataset_mb": {str(r): v for r, v in dataset_mb.items()}, "growth": growth}


if __name__ == "__main__":
    main()
