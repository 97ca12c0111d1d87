"""Each benchmark once, on a tiny size: it runs, and its JSON holds the figures BENCHMARKS.md quotes.

The figures themselves are measured by running the benchmarks (BENCHMARKS.md), never asserted here:
these machines are shared and their timings noisy. So their commands run against the session's Ray
head (``DEEPLENSE_BENCH_RAY_ADDRESS``) rather than a local Ray each, one repetition, the smallest sizes
that still take every code path; but for the memory benchmark, which measures the processes of the
local Ray its commands start.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks.sweep_overhead import ARMS
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow


def bench(name: str, tmp_path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    head = os.environ.get("RAY_ADDRESS", "")  # the session's head; unset for an own_ray test
    result = run_cli(f"benchmarks.{name}", *args, f"--out={out}", cwd=ROOT, timeout=900,
                     env={"DEEPLENSE_BENCH_RAY_ADDRESS": head})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    return json.loads(out.read_text())


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def test_simulator_benchmark(tmp_path):
    sizes = bench("simulator", tmp_path, "--images=8", "--repeats=1")["sizes"]
    assert set(sizes) == {"64x64", "150x150"} and positive(*(s["median_images_per_s"] for s in sizes.values()))


@pytest.mark.heavy
def test_training_overhead_benchmark(tmp_path):
    s = bench("train_overhead", tmp_path, "--num-train=64", "--num-val=32", "--epochs=2", "--batch-size=32",
              "--repeats=1", f"--cache={tmp_path / 'cache'}")["summary"]
    assert positive(s["steady_state_ratio"], s["plain_samples_per_s"], s["platform_samples_per_s"],
                    s["platform_wall_s"], s["platform_to_first_step_s"])


@pytest.mark.heavy
def test_data_throughput_benchmark(tmp_path):
    s = bench("data_throughput", tmp_path, "--images=64", "--epochs=2", "--batch-size=32", "--steps=1",
              f"--cache={tmp_path / 'cache'}")["summary"]
    assert s["size"] == "150x150"
    assert positive(s["streamed_images_per_s"], s["in_memory_images_per_s"], s["consumed_images_per_s"])


# Each of the script's code paths once: the platform's Ray-worker arm is the same command as its
# in-process arm with other settings, and the end-to-end tests run that path. Two tests, so that
# neither is the suite's longest: the bare Ray Train arm, and the two in-process arms.
@pytest.mark.heavy
@pytest.mark.parametrize("arms", [["bare"], ["bare_in_process", "platform"]], ids=["train", "in_process"])
def test_sweep_overhead_benchmark(tmp_path, arms):
    s = bench("sweep_overhead", tmp_path, "--trials=1", "--num-train=32", "--num-val=16", "--epochs=1",
              "--repeats=1", "--arms", *arms, f"--cache={tmp_path / 'cache'}")["summary"]
    assert set(s) & set(ARMS) == set(arms)
    for kind in arms:
        assert positive(s[kind]["sweep_wall_s"], s[kind]["seconds_per_trial"], s[kind]["to_first_step_s"])


def test_search_efficiency_benchmark(tmp_path):
    # One arm: the arms are one platform.tune command with other tune.search/scheduler settings, and
    # the platform's default (TPE, ASHA, stopped trials told as pruned) is the one with most to go wrong.
    result = bench("search_efficiency", tmp_path, "--seeds", "0", "--budget=2", "--epochs=1", "--num-train=48",
                   "--num-val=30", "--arms", "tpe+asha", "--target=0.5", f"--cache={tmp_path / 'cache'}")
    trace = result["traces"]["tpe+asha"]["0"]
    assert 1 <= len(trace) <= 2 and all(0 <= v <= 1 for v in trace)
    assert result["summary"]["tpe+asha"]["best_at_budget"] == [max(trace)]


@pytest.mark.heavy
@pytest.mark.long
def test_search_features_benchmark(tmp_path):
    result = bench("search_features", tmp_path, "--seeds", "0", "--trials=2", "--epochs=1", "--num-train=48",
                   "--num-val=30", "--pbt-trials=2", f"--cache={tmp_path / 'cache'}")
    for arm in ("conditional", "flat"):
        trace = result["traces"][arm]["0"]
        assert 1 <= len(trace) <= 2 and all(0 <= v <= 1 for v in trace)
    trials = result["pbt"]["trials"]
    assert len(trials) == 2 and result["pbt"]["exploits"] == sum(len(t["exploits"]) for t in trials)
    assert all(t["lr_history"][0][0] == 0 for t in trials)  # each trial's first value, at step 0


@pytest.mark.heavy
@pytest.mark.long
def test_domain_adaptation_benchmark(tmp_path):
    result = bench("domain_adaptation", tmp_path, "--seeds", "0", "--epochs=1", "--num-train=64", "--num-val=40",
                   "--num-target=24", "--num-target-test=20", f"--cache={tmp_path / 'cache'}")
    assert set(result["summary"]) == {"none", "dann", "coral", "oracle"}
    for arm, runs in result["runs"].items():
        (row,) = runs  # one seed
        assert 0 <= row["target_test_roc_auc"] <= 1 and 0 <= row["source_test_roc_auc"] <= 1, (arm, row)


TINY_MAE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1"]


# The memory benchmark's two parts, one test each (each measures the processes of the local Ray
# its commands start). One sample every 2 s: reading every process's memory map costs CPU the
# commands would want.
@pytest.mark.own_ray
def test_memory_benchmark_of_a_sweep(tmp_path):
    result = bench("memory", tmp_path, "--parts", "sweep", "--interval=2", f"--cache={tmp_path / 'cache'}",
                   "--sweep-args", "tune.num_samples=1", "train.epochs=1", "data.num_train=48", "data.num_val=30",
                   "scaling.num_workers=0", *TINY_MAE)  # Train workers: the other part
    assert positive(result["sweep"]["driver"]["rss_mb"], result["sweep"]["all processes (USS summed)"]["uss_mb"])
    assert "two_workers" not in result


@pytest.mark.own_ray
@pytest.mark.heavy
@pytest.mark.long
def test_memory_benchmark_of_two_train_workers(tmp_path):
    result = bench("memory", tmp_path, "--parts", "workers", "--small-rows=64", "--share-rows=128", "--interval=2",
                   f"--cache={tmp_path / 'cache'}", "--train-args", *TINY_MAE,
                   "plots.gradcam=false", "plots.embeddings=false")  # the figures: test_researcher_view.py
    assert result["two_workers"]["128"]["RayTrainWorker"]["processes"] >= 2
    assert positive(result["two_workers"]["64"]["RayTrainWorker"]["uss_mb"], result["growth"]["dataset_mb"])
    assert "sweep" not in result


@pytest.mark.heavy
@pytest.mark.long
def test_gpu_benchmark_runs_every_part_in_a_dry_run(tmp_path):
    # No GPU here: --dry-run takes every code path on the CPU at toy sizes (the figures are the GPU's);
    # one case of the three, which differ only in their settings (all ran in a dry run by hand).
    result = bench("gpu", tmp_path, "--dry-run", "--cases", "mae 64x64", f"--cache={tmp_path / 'cache'}")
    assert set(result["cases"]) == {"mae 64x64"}
    for case in result["cases"].values():
        assert case["batch"] == 64 and positive(case["ceiling_images_per_s"], case["samples_per_s"])
    assert positive(*result["simulator_images_per_s"].values())
    shared = result["shared_gpu"]
    assert [s["trials"] for s in shared.values()] == [1, 4] and positive(*(s["images_per_s"] for s in shared.values()))


def test_folder_conversion_benchmark(tmp_path):
    s = bench("folder_conversion", tmp_path, "--files=60", "--side=32")["summary"]
    assert s["converted_files"] == 60 and positive(s["files_per_s"], s["peak_rss_mb"], s["folder_gb"])
