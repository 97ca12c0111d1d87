"""Sweep overhead: what a trial costs beyond its training, in ``platform.tune`` and in bare Ray.

    python -m benchmarks.sweep_overhead [--trials 4] [--num-train 256] [--epochs 2] [--repeats 2]

Every trial does the same fixed tiny work: ``classification`` (ResNet-18) on the same simulated
shards for ``--epochs`` epochs, one worker, one CPU, trials one after another. Three commands,
each in a fresh process, interleaved over repetitions, medians:

- the work: the plain PyTorch loop of ``benchmarks.train_overhead``, its time from first step to
  the end of its last evaluation;
- bare Ray: a Ray Tune sweep whose trials each fit a Ray Train ``TorchTrainer`` running the same
  steps on a Ray Data shard, reported once per epoch: no MLflow, no checkpoints, random search,
  no scheduler (what one wires by hand);
- the platform with Ray Train workers: ``python -m platform.tune scaling.num_workers=1`` with random
  search and no scheduler, so every trial runs every epoch;
- bare Ray, in-process: a Ray Tune sweep whose function trains in the trial's own process, the
  data handed over with ``tune.with_parameters`` (the object store), actors reused between trials;
- the platform: the same ``platform.tune`` with its default ``scaling.num_workers=auto`` (each trial
  in its own process, reused).

Seconds per trial: from the first trial function's start to the last one's end, over the
number of trials (the gaps between trials included); the rest of the wall time is the sweep's
fixed cost (imports, Ray start, the first trial's process, the best model logged at the end).
Overhead per trial = seconds per trial minus the work. Start-up to first step: from the trial
function's start to its first batch in hand (the platform's ``time/to_first_step_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from benchmarks.common import ROOT, median, run, save, table

TASK = "classification"


def settings(args) -> list[str]:
    return [f"data.num_train={args.num_train}", f"data.num_val={args.num_val}", f"data.cache_dir={args.cache}",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "model.name=resnet18",
            "scaling.cpus_per_worker=1"]  # one CPU per trial in every arm, and one thread for the plain work


def fit(task, cfg, lr: float, train_batches, val_batches, report, started_at: float, prepare=lambda m: m) -> None:
    """The bare sweeps' training: the same steps as the plain loop, one report per epoch."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = prepare(task.build_model(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    first_step = None
    for epoch in range(cfg.train.epochs):
        model.train()
        for batch in train_batches(epoch):
            first_step = first_step or time.time()
            loss = task.train_step(model, task.collate(batch, cfg, True), cfg)["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
        model.eval()
        outputs = []
        with torch.no_grad():
            for batch in val_batches():
                out = task.eval_step(model, task.collate(batch, cfg, False), cfg)
                outputs.append({k: v.numpy() for k, v in out.items()})
        metrics = task.evaluate({k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}, cfg)
        report({"auc": metrics[task.metric], "to_first_step_s": first_step - started_at})


def bare_in_process_sweep(trials: int, overrides: list[str], storage: str) -> dict:
    """The in-process baseline, in this process: Ray Tune trials that train themselves, reused actors."""
    import numpy as np
    import ray
    from ray import tune

    from platform import config as config_lib, registry
    from platform.data import shards as shards_lib

    cfg = config_lib.build(TASK, [config_lib.parse_cli([f"task={TASK}", *overrides])[1]])
    task = registry.get(TASK)
    rows = {split: shards_lib.in_memory(s) for split, s in task.build_data(cfg).items()}
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": ROOT}}, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False)

    def batches(split_rows, seed=None):
        n = len(split_rows["image"])
        order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
        for start in range(0, n, cfg.train.batch_size):
            picked = order[start:start + cfg.train.batch_size]
            yield {k: v[picked] for k, v in split_rows.items()}

    def trial(params, train, val):
        import torch

        started = time.time()
        torch.set_num_threads(1)
        fit(task, cfg, params["lr"], lambda epoch: batches(train, epoch), lambda: batches(val), tune.report, started)
        with open(os.path.join(storage, "spans.txt"), "a") as f:
            f.write(f"{started} {time.time()}\n")

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, train=rows["train"], val=rows["val"]), {"CPU": 1}),
        param_space={"lr": tune.loguniform(1e-4, 3e-3)},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name="bare-in-process", storage_path=storage),
    )
    return spans_of(tuner.fit(), storage)


def spans_of(results, storage: str) -> dict:
    with open(os.path.join(storage, "spans.txt")) as f:
        spans = [tuple(map(float, line.split())) for line in f]
    return {"to_first_step_s": [r.metrics_dataframe["to_first_step_s"].iloc[0] for r in results],
            "span_s": max(end for _, end in spans) - min(start for start, _ in spans)}


def bare_sweep(trials: int, overrides: list[str], storage: str) -> dict:
    """The baseline, in this process: Ray Tune -> TorchTrainer -> the same steps. Returns start-ups to first step."""
    import ray
    import ray.data
    import ray.train
    import ray.train.torch
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from platform import config as config_lib, registry

    cfg = config_lib.build(TASK, [config_lib.parse_cli([f"task={TASK}", *overrides])[1]])
    shards = registry.get(TASK).build_data(cfg)
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": ROOT}}, include_dashboard=True, dashboard_host="127.0.0.1",
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def train_loop(config):
        task, cfg = registry.get(TASK), config_lib.from_dict(config["cfg"])

        def train_batches(epoch):
            return ray.train.get_dataset_shard("train").iter_batches(
                batch_size=cfg.train.batch_size, batch_format="numpy", local_shuffle_buffer_size=256)

        def val_batches():
            return ray.train.get_dataset_shard("val").iter_batches(batch_size=cfg.train.batch_size,
                                                                   batch_format="numpy")

        fit(task, cfg, config["lr"], train_batches, val_batches, ray.train.report, config["started_at"],
            ray.train.torch.prepare_model)

    def trial(params):
        started = time.time()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": config_lib.to_dict(cfg), "lr": params["lr"], "started_at": time.time()},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"bare-{tune.get_context().get_trial_id()}", storage_path=storage,
                                 callbacks=[TuneReportCallback()]),
            datasets={split: ray.data.read_parquet(s.files) for split, s in shards.items()},
        )
        trainer.fit()
        with open(os.path.join(storage, "spans.txt"), "a") as f:  # this machine: the driver reads it
            f.write(f"{started} {time.time()}\n")

    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": 0, "memory": 2**28}),
        param_space={"lr": tune.loguniform(1e-4, 3e-3)},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="bare", storage_path=storage),
    )
    return spans_of(tuner.fit(), storage)


# What each arm is called in the table, and how it runs: its own mode of this script (bare Ray)
# or ``platform.tune`` with these extra settings.
ARMS = {
    "bare": ("bare Ray Tune + Train", "--bare"),
    "platform_train_workers": ("platform.tune scaling.num_workers=1", ["scaling.num_workers=1"]),
    "bare_in_process": ("bare Ray Tune, in-process", "--bare-in-process"),
    "platform": ("platform.tune (defaults)", []),
}


def measure(kind: str, trials: int, overrides: list[str], workdir: str, name: str) -> dict:
    how = ARMS[kind][1]
    if isinstance(how, str):
        wall, out = run([sys.executable, "-m", "benchmarks.sweep_overhead", how, str(trials), *overrides], cwd=workdir)
        return {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])}
    from mlflow.tracking import MlflowClient

    db = os.path.join(workdir, "mlflow.db")
    wall, _ = run([sys.executable, "-m", "platform.tune", f"task={TASK}", *overrides, *how, f"tune.name={name}",
                   f"tune.num_samples={trials}", "tune.search=random", "tune.scheduler=none", "tune.max_concurrent=1",
                   f"tune.space={os.path.join(workdir, 'space.yaml')}", f"mlflow.tracking_uri=sqlite:///{db}",
                   "mlflow.register_model=false"], cwd=workdir)
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(f"deeplense-{TASK}").experiment_id
    from platform.runs import sweep_runs

    runs = [r for r in sweep_runs(client, experiment, name) if "platform.trial_id" in r.data.tags]
    return {"wall_s": wall, "to_first_step_s": [r.data.metrics["time/to_first_step_s"] for r in runs],
            "span_s": (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000}


def work(overrides: list[str], workdir: str) -> float:
    """Seconds of the plain loop from its first step to its end: one trial's work."""
    _, out = run([sys.executable, "-m", "benchmarks.train_overhead", "--plain", *overrides], cwd=workdir)
    return json.loads(out.strip().splitlines()[-1])["work_s"]


def main(argv: list[str] | None = None) -> dict:
    if argv is None and sys.argv[1:2] in (["--bare"], ["--bare-in-process"]):  # a bare-Ray sweep's own process
        sweep = bare_sweep if sys.argv[1] == "--bare" else bare_in_process_sweep
        with tempfile.TemporaryDirectory(prefix="bench-bare-") as storage:
            print(json.dumps(sweep(int(sys.argv[2]), sys.argv[3:], storage)))
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "results", "cache"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sweep_overhead.json"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args(argv)
    overrides = settings(args)

    runs = {kind: [] for kind in args.arms}
    works = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as workdir:
        with open(os.path.join(workdir, "space.yaml"), "w") as f:
            f.write("search:\n  train.lr: {loguniform: [1.0e-4, 3.0e-3]}\n")  # fixed work: only the lr varies
        for repeat in range(args.repeats):
            works.append(work(overrides, workdir))
            print(f"repeat {repeat + 1}: one trial's work {works[-1]:.1f}s", flush=True)
            for kind in args.arms[repeat % len(args.arms):] + args.arms[:repeat % len(args.arms)]:  # rotated
                name = f"bench-{kind.replace('_', '-')}-{repeat}"
                runs[kind].append(measure(kind, args.trials, overrides, workdir, name))
                print(f"repeat {repeat + 1}: {kind} sweep of {args.trials} trials {runs[kind][-1]['wall_s']:.1f}s",
                      flush=True)

    one_trial = median(works)
    summary = {"work_per_trial_s": one_trial, "trials": args.trials}
    rows = []
    for kind in args.arms:
        per_trial = median([r["span_s"] / args.trials for r in runs[kind]])
        summary[kind] = {
            "sweep_wall_s": median([r["wall_s"] for r in runs[kind]]),
            "wall_over_work": median([r["wall_s"] / (args.trials * one_trial) for r in runs[kind]]),
            "seconds_per_trial": per_trial,
            "overhead_per_trial_s": per_trial - one_trial,
            "fixed_s": median([r["wall_s"] - r["span_s"] for r in runs[kind]]),
            "to_first_step_s": median([s for r in runs[kind] for s in r["to_first_step_s"]]),
        }
        s = summary[kind]
        rows.append([ARMS[kind][0], s["sweep_wall_s"],
                     s["wall_over_work"], s["seconds_per_trial"], s["overhead_per_trial_s"], s["fixed_s"],
                     s["to_first_step_s"]])
    added = []
    for platform_arm, bare_arm in (("platform", "bare_in_process"), ("platform_train_workers", "bare")):
        if platform_arm in summary and bare_arm in summary:
            summary[f"{platform_arm}_adds_per_trial_s"] = (summary[platform_arm]["seconds_per_trial"]
                                                           - summary[bare_arm]["seconds_per_trial"])
            added.append(f"{ARMS[platform_arm][0]} adds {summary[f'{platform_arm}_adds_per_trial_s']:.1f}s per trial "
                         f"over {ARMS[bare_arm][0]}")
    print()
    print(table([f"{args.trials} trials", "wall s", "wall / work", "s per trial", "overhead per trial s",
                 "fixed s", "to first step s"], rows))
    print(f"\none trial's work: {one_trial:.1f}s; " + "; ".join(added) + " (target: overhead under 5 s per trial)")
    result = {"benchmark": "sweep_overhead",
              "command": "python -m benchmarks.sweep_overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(args), "summary": summary, "runs": runs, "work_s": works}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
