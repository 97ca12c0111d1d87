"""Training overhead: ``python -m platform.train`` with its default settings against a plain PyTorch loop on all cores.

    python -m benchmarks.train_overhead [--num-train 2048] [--epochs 3] [--batch-size 64] [--repeats 3] [--cpus N]

The same ``classification`` model (timm ResNet-18), the same simulated Parquet shards, batch
size, number of steps, augmentation, AdamW with gradient clipping and a cosine schedule. The
plain loop uses torch's default threads (every core), which is what a user compares with; the
platform runs with its defaults (``scaling.num_workers=auto``, ``scaling.cpus_per_worker=auto``:
one worker in the command's own process, with every core of a machine of its own). ``--cpus N``
instead gives both N threads (``scaling.cpus_per_worker=N``, ``scaling.num_workers=1``: one Ray
Train worker). Both evaluate on the validation split after each epoch. Each repetition runs both,
in alternating order, each in a fresh process; medians over repetitions.

- steady state: samples/s of the training steps in epochs 2.. (the first warms up allocators),
  measured the same way in both (``train/samples_per_s`` on the MLflow run for the platform);
- start-up: seconds from the command's start to its first training step, and the whole wall
  time of each command. The platform's extra wall time is its fixed cost: Ray, the worker
  group, the data pipeline, MLflow logging and the model it logs at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

from benchmarks.common import ROOT, median, run, save, table

TASK = "classification"


def settings(args) -> list[str]:
    given = [f"scaling.cpus_per_worker={args.cpus}", "scaling.num_workers=1"] if args.cpus else []
    return [f"data.num_train={args.num_train}", f"data.num_val={args.num_val}", f"data.cache_dir={args.cache}",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"model.name={args.model}", *given]


def plain_loop(overrides: list[str], started_at: float) -> dict:
    """The hand-written baseline: Parquet into memory with pyarrow, shuffled batches, a plain loop."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from platform import config as config_lib, registry

    cfg = config_lib.build(TASK, [config_lib.parse_cli([f"task={TASK}", *overrides])[1]])
    if cfg.scaling.cpus_per_worker != config_lib.AUTO:  # else torch's default: every core
        torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
    task = registry.get(TASK)
    shards = task.build_data(cfg)  # cached: the same files the platform reads

    def load(split):
        table = pa.concat_tables([pq.read_table(f) for f in shards[split].files])
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}

    train, val = load("train"), load("val")
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    model = task.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rows, batch_size = len(train["label"]), cfg.train.batch_size
    steps_per_epoch = math.ceil(rows / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.train.epochs * steps_per_epoch)
    first_step_s, rates = None, []
    for epoch in range(cfg.train.epochs):
        model.train()
        started, samples = time.perf_counter(), 0
        order = np.random.permutation(rows)
        for start in range(0, rows, batch_size):
            if first_step_s is None:
                first_step_s = time.time() - started_at
            picked = order[start:start + batch_size]
            batch = task.collate({k: v[picked] for k, v in train.items()}, cfg, True)
            loss = task.train_step(model, batch, cfg)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            samples += len(picked)
        rates.append(samples / (time.perf_counter() - started))
        model.eval()
        outputs = []
        with torch.no_grad():
            for start in range(0, len(val["label"]), batch_size):
                batch = task.collate({k: v[start:start + batch_size] for k, v in val.items()}, cfg, False)
                outputs.append({k: v.numpy() for k, v in task.eval_step(model, batch, cfg).items()})
        metrics = task.evaluate({k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}, cfg)
        print(f"epoch {epoch + 1} {rates[-1]:.0f} samples/s val/{task.metric}={metrics[task.metric]:.4f}", file=sys.stderr)
    return {"samples_per_s": rates, "first_step_s": first_step_s, "threads": torch.get_num_threads(),
            "work_s": time.time() - started_at - first_step_s}  # first step to the last evaluation's end


def platform_run(overrides: list[str], workdir: str, name: str) -> dict:
    from mlflow.tracking import MlflowClient

    db = os.path.join(workdir, "mlflow.db")
    wall, _ = run([sys.executable, "-m", "platform.train", f"task={TASK}", *overrides, f"train.name={name}",
                   f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.register_model=false"], cwd=workdir)
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(f"deeplense-{TASK}")
    from platform import runs

    run_id = runs.find_run(client, experiment.experiment_id, {"mlflow.runName": name})
    history = sorted(client.get_metric_history(run_id, "train/samples_per_s"), key=lambda m: m.step)
    first = client.get_metric_history(run_id, "time/to_first_step_s")
    return {"wall_s": wall, "samples_per_s": [m.value for m in history], "to_first_step_s": first[0].value}


def plain_run(overrides: list[str], workdir: str) -> dict:
    wall, out = run([sys.executable, "-m", "benchmarks.train_overhead", "--plain", *overrides], cwd=workdir)
    return {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])}


def steady(rates: list[float]) -> float:
    return median(rates[1:] or rates)


def main(argv: list[str] | None = None) -> dict:
    if argv is None and sys.argv[1:2] == ["--plain"]:  # the baseline's own process
        started_at = time.time()
        print(json.dumps(plain_loop(sys.argv[2:], started_at)))
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--cpus", type=float, default=None,
                        help="scaling.cpus_per_worker on one Ray Train worker, and the plain loop's threads "
                             "(default: the platform's defaults against a plain loop on every core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "results", "cache"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_overhead.json"))
    args = parser.parse_args(argv)
    overrides = settings(args)

    runs = {"plain": [], "platform": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        for repeat in range(args.repeats):
            order = ["plain", "platform"] if repeat % 2 == 0 else ["platform", "plain"]
            for kind in order:
                if kind == "plain":
                    runs[kind].append(plain_run(overrides, workdir))
                else:
                    runs[kind].append(platform_run(overrides, workdir, f"bench-{repeat}"))
                print(f"repeat {repeat + 1}/{args.repeats} {kind}: {runs[kind][-1]['wall_s']:.1f}s wall, "
                      f"{steady(runs[kind][-1]['samples_per_s']):.1f} samples/s", flush=True)

    plain_rate = median([steady(r["samples_per_s"]) for r in runs["plain"]])
    platform_rate = median([steady(r["samples_per_s"]) for r in runs["platform"]])
    ratios = [steady(b["samples_per_s"]) / steady(a["samples_per_s"]) for a, b in zip(runs["plain"], runs["platform"])]
    summary = {
        "plain_samples_per_s": plain_rate,
        "platform_samples_per_s": platform_rate,
        "steady_state_ratio": median(ratios),
        "plain_wall_s": median([r["wall_s"] for r in runs["plain"]]),
        "platform_wall_s": median([r["wall_s"] for r in runs["platform"]]),
        "plain_to_first_step_s": median([r["first_step_s"] for r in runs["plain"]]),
        "platform_to_first_step_s": median([r["to_first_step_s"] for r in runs["platform"]]),
    }
    summary["fixed_cost_s"] = summary["platform_wall_s"] - summary["plain_wall_s"]
    print()
    plain_label = f"plain PyTorch, {runs['plain'][0]['threads']} threads" + ("" if args.cpus else " (all cores)")
    print(table(["", "samples/s (steady)", "wall s", "to first step s"], [
        [plain_label, plain_rate, summary["plain_wall_s"], summary["plain_to_first_step_s"]],
        ["platform.train" + (f" (cpus_per_worker={args.cpus:g})" if args.cpus else " (defaults)"), platform_rate,
         summary["platform_wall_s"], summary["platform_to_first_step_s"]],
    ]))
    print(f"\nsteady state: platform / plain = {summary['steady_state_ratio']:.3f} (median of {args.repeats} paired "
          f"repeats; target >= 0.95); fixed cost {summary['fixed_cost_s']:.1f} s per run")
    result = {"benchmark": "train_overhead", "command": "python -m benchmarks.train_overhead " + " ".join(argv or sys.argv[1:]),
              "settings": vars(args) | {"threads": runs["plain"][0]["threads"]}, "summary": summary, "runs": runs}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
