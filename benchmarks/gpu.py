"""GPU throughput: what the platform gets out of one GPU, against the same model's bare ceiling.

    python -m benchmarks.gpu [--rows 8192] [--epochs 3] [--out benchmarks/results/gpu.json]

Needs a CUDA GPU (under 5 minutes on one); without one it says so and exits 2. ``--dry-run`` runs
every part on the CPU at toy sizes, to check the script itself.

1. Ceiling against the platform, for ``classification`` (timm ResNet-18) at 64x64 (``model_ii``)
   and 150x150 (``model_i``), and ``mae`` (its ViT at 64x64):
   - the ceiling: the task's model and ``train_step`` on random images already on the GPU, AdamW,
     bf16 autocast, channels-last, at the batch that fills the GPU (doubling from 64 up to
     ``--max-batch`` while a step fits in its memory), images/s over timed steps after warm-up;
   - the platform: ``python -m platform.train`` on simulated data of ``--rows`` images at that
     batch, ``scaling.use_gpu=true train.precision=bf16 train.memory_format=channels_last``,
     steady-state ``train/samples_per_s`` (epochs 2 on) from its MLflow run.
2. The simulator on the GPU against the CPU (``simulate(..., device="cuda")``): images/s at
   150x150 with 25 subhaloes.
3. Four trials sharing the GPU against one: ``platform.tune task=classification`` (64x64) with
   ``scaling.gpus_per_worker=0.25`` and four trials, against one trial with the whole GPU at the
   same batch; total images/s = the trials' steady ``train/samples_per_s`` summed (they run at once).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from benchmarks.common import ROOT, median, run, save, table

CASES = [  # (name, task, settings)
    ("classification 64x64", "classification", ["data.preset=model_ii", "model.name=resnet18"]),
    ("classification 150x150", "classification", ["data.preset=model_i", "model.name=resnet18"]),
    ("mae 64x64", "mae", ["data.preset=model_ii"]),
]


def ceiling(task_name: str, settings: list[str], device, max_batch: int, steps: int) -> tuple[int, float]:
    """(the batch that fills the GPU, images/s of the bare forward-backward-step at it)."""
    import torch

    from platform import config as config_lib, registry
    from platform.data.simulate import get_preset

    import numpy as np

    from platform.loop import to_device

    cfg = config_lib.build(task_name, [config_lib.parse_cli([f"task={task_name}", *settings])[1]])
    task = registry.task_of(cfg)
    side = get_preset(cfg.data.preset).n_pix

    def rate(batch: int) -> float:
        torch.manual_seed(0)
        model = task.build_model(cfg).to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rng = np.random.default_rng(0)  # one batch in the shards' form, through the task's own collate, kept
        rows = {"image": rng.random((batch, 1, side, side), dtype=np.float32),
                "label": rng.integers(0, 3, batch).astype(np.int64)}
        example = to_device(task.collate(rows, cfg, False), device, channels_last=True)
        timed, started = 0, None
        for step in range(steps + 5):
            if step == 5:  # warm-up done: cuDNN's choices, the allocator
                synchronize(device)
                started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = task.train_step(model, example, cfg)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            timed += batch if step >= 5 else 0
        synchronize(device)
        return timed / (time.perf_counter() - started)

    batch, best = 64, None
    while batch <= max_batch:
        try:
            best = (batch, rate(batch))
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    return best


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def platform_rate(task_name: str, settings: list[str], batch: int, args, workdir: str, gpu: bool) -> dict:
    from mlflow.tracking import MlflowClient

    from platform import runs

    db = os.path.join(workdir, "mlflow.db")
    name = f"gpu-{task_name}-{len(os.listdir(workdir))}"
    wall, _ = run([sys.executable, "-m", "platform.train", f"task={task_name}", *settings, *common(args, gpu),
                   f"train.batch_size={batch}", f"train.name={name}", f"mlflow.tracking_uri=sqlite:///{db}"], cwd=workdir)
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(f"deeplense-{task_name}").experiment_id
    run_id = runs.find_run(client, experiment, {"mlflow.runName": name})
    rates = [m.value for m in sorted(client.get_metric_history(run_id, "train/samples_per_s"), key=lambda m: m.step)]
    return {"wall_s": wall, "samples_per_s": median(rates[1:] or rates)}


def common(args, gpu: bool) -> list[str]:
    return [f"data.num_train={args.rows}", f"data.num_val={max(64, args.rows // 8)}", f"train.epochs={args.epochs}",
            f"data.cache_dir={args.cache}", "mlflow.register_model=false", "plots.gradcam=false",
            "plots.embeddings=false", *(["scaling.use_gpu=true", "train.precision=bf16",
                                         "train.memory_format=channels_last"] if gpu else [])]


def simulator_rates(device, images: int) -> dict:
    from platform.data.simulate import simulate

    out = {}
    for where in ("cpu", device.type):
        simulate("model_i", 16, 0, device=where)  # first-call costs out of the figure
        started = time.perf_counter()
        simulate("model_i", images, 1, device=where)
        out[where] = images / (time.perf_counter() - started)
    return out


def shared_gpu(args, batch: int, workdir: str, gpu: bool) -> dict:
    """Total images/s of four trials on a quarter of the GPU each, and of one trial on all of it."""
    from mlflow.tracking import MlflowClient

    from platform.runs import sweep_runs

    db = os.path.join(workdir, "mlflow.db")
    out = {}
    for label, trials, share in (("one trial, whole GPU", 1, 1.0), ("four trials, a quarter each", 4, 0.25)):
        name = f"gpu-share-{trials}"
        fraction = [f"scaling.gpus_per_worker={share}"] if gpu else [f"scaling.cpus_per_worker={share}"]
        wall, _ = run([sys.executable, "-m", "platform.tune", "task=classification", "data.preset=model_ii",
                       *common(args, gpu), *fraction, f"train.batch_size={batch}", f"tune.num_samples={trials}",
                       "tune.scheduler=none", f"tune.name={name}", f"mlflow.tracking_uri=sqlite:///{db}"], cwd=workdir)
        client = MlflowClient(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name("deeplense-classification").experiment_id
        trial_runs = [r for r in sweep_runs(client, experiment, name) if "platform.trial_id" in r.data.tags]
        rates = []
        for r in trial_runs:
            history = sorted(client.get_metric_history(r.info.run_id, "train/samples_per_s"), key=lambda m: m.step)
            rates.append(median([m.value for m in history][1:] or [m.value for m in history]))
        out[label] = {"wall_s": wall, "trials": len(trial_runs), "images_per_s": sum(rates)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--simulated", type=int, default=2048, help="images the simulator draws on each device")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at toy sizes")
    parser.add_argument("--cases", nargs="+", choices=[name for name, _, _ in CASES], default=[name for name, _, _ in CASES])
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "results", "cache"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu.json"))
    args = parser.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("benchmarks.gpu needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run checks the script "
              "on the CPU", file=sys.stderr)
        raise SystemExit(2)
    if args.dry_run:
        args.rows, args.epochs, args.max_batch, args.steps, args.simulated = 64, 2, 64, 2, 32
    device = torch.device("cuda" if gpu else "cpu")
    started = time.time()
    result = {"benchmark": "gpu", "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name(0) if gpu else "cpu (dry run)", "settings": vars(args), "cases": {}}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as workdir:
        for name, task_name, settings in [c for c in CASES if c[0] in args.cases]:
            batch, bare = ceiling(task_name, settings, device, args.max_batch, args.steps)
            platform = platform_rate(task_name, settings, batch, args, workdir, gpu)
            result["cases"][name] = {"batch": batch, "ceiling_images_per_s": bare, **platform,
                                     "ratio": platform["samples_per_s"] / bare}
            rows.append([name, batch, bare, platform["samples_per_s"], platform["samples_per_s"] / bare])
            print(f"{name}: batch {batch}, ceiling {bare:.0f} images/s, platform.train {platform['samples_per_s']:.0f}",
                  flush=True)
        result["simulator_images_per_s"] = simulator_rates(device, args.simulated)
        batch = result["cases"].get("classification 64x64", {}).get("batch", 64 if args.dry_run else 256)
        result["shared_gpu"] = shared_gpu(args, batch, workdir, gpu)
    result["wall_s"] = time.time() - started
    print()
    print(table(["", "batch", "ceiling images/s", "platform.train images/s", "platform / ceiling"], rows))
    sim = result["simulator_images_per_s"]
    print("\nsimulator, 150x150 with 25 subhaloes: " + ", ".join(f"{k} {v:.0f} images/s" for k, v in sim.items()))
    for label, shared in result["shared_gpu"].items():
        print(f"{label}: {shared['trials']} trials, {shared['images_per_s']:.0f} images/s in all")
    print(f"device: {result['device']}; {result['wall_s']:.0f} s in all")
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
