"""What the benchmarks share: the machine's description, medians, a table, the JSON file,
and running the platform's own CLIs as a user does (loopback Ray, the project on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}").replace("  ", " ")


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def environment(**extra: str) -> dict:
    """A user's shell: the project on PYTHONPATH, and every Ray started here on loopback.

    Each command starts its own local Ray, as on a laptop, unless $DEEPLENSE_BENCH_RAY_ADDRESS names a
    running head: the test suite's smoke runs, which check the code paths, not the figures.
    """
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DEEPLENSE_RESULTS"):
        env.pop(name, None)
    if os.environ.get("DEEPLENSE_BENCH_RAY_ADDRESS"):
        env["RAY_ADDRESS"] = os.environ["DEEPLENSE_BENCH_RAY_ADDRESS"]
    return {**env, **extra}


def run(args: list[str], cwd: str, **env: str) -> tuple[float, str]:
    """(wall seconds, stdout) of one command; a failure stops the benchmark with the command's own output."""
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=environment(**env), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"benchmark command failed ({done.returncode}): {' '.join(args)}")
    return wall, done.stdout


def table(header: list[str], rows: list[list]) -> str:
    cells = [["-" if c is None else f"{c:.3g}" if isinstance(c, float) and abs(c) < 100
              else f"{c:.0f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **result}, f, indent=2)
    print(f"\nwrote {path}")
