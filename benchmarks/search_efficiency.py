"""Search efficiency: TPE with ASHA against random search without early stopping, same epoch budget.

    python -m benchmarks.search_efficiency [--seeds 0 1 2] [--budget 24] [--epochs 4] [--target 0.8]

``classification`` on the simulator (64x64, 512 training and 256 validation images, ResNet-18),
a wide search space (learning rate over four decades, weight decay, batch size, augmentation),
every sweep through ``python -m platform.tune``, one trial at a time, each trial training in
its own reused process (``scaling.num_workers=0``: seconds, not half a minute, between trials;
the search is the same either way). Three arms, each with
the same budget of training epochs, for every seed (``tune.seed``; the data stay the same):

- random:       random search, no scheduler: budget / epochs trials that all run every epoch;
- tpe+asha:     TPE and ASHA (grace 1 epoch, halving), trials ASHA stops told to Optuna as
                pruned with their per-epoch values (the platform's default);
- tpe+asha/complete: the same, with stopped trials told as complete with their last value
                (Ray's own behaviour), to show whether telling the truth helps.

Every validation epoch of every trial is one unit of budget, in the order the epochs ended
(MLflow's metric timestamps). Per sweep: the best validation AUC within the budget, and the
budget spent when the best first reached ``--target``. Medians over seeds; every trace is in
the JSON, so another target can be read off without rerunning.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from benchmarks.common import ROOT, median, run, save, table

TASK = "classification"
METRIC = "val/auc_macro"
SPACE = """search:
  train.lr: {loguniform: [1.0e-5, 1.0e-1]}
  train.weight_decay: {loguniform: [1.0e-6, 1.0e-1]}
  train.batch_size: {choice: [16, 32, 64]}
  augment.strength: {uniform: [0.0, 1.0]}
"""
ARMS = {
    "random": ["tune.search=random", "tune.scheduler=none"],
    "tpe+asha": ["tune.search=tpe", "tune.scheduler=asha", "tune.stopped_trials=pruned"],
    "tpe+asha/complete": ["tune.search=tpe", "tune.scheduler=asha", "tune.stopped_trials=complete"],
}


def trace(db: str, sweep: str, task: str = TASK) -> list[float]:
    """The sweep's validation AUC of every epoch of every trial, in the order the epochs ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(f"deeplense-{task}").experiment_id
    events = []
    from platform.runs import sweep_runs

    for run_ in sweep_runs(client, experiment, sweep):
        if "platform.trial_id" in run_.data.tags:
            events += [(m.timestamp, m.step, m.value) for m in client.get_metric_history(run_.info.run_id, METRIC)]
    return [value for _, _, value in sorted(events)]


def score(values: list[float], budget: int, target: float) -> dict:
    within = values[:budget]
    best, reached = float("-inf"), None
    for spent, value in enumerate(within, 1):
        best = max(best, value)
        if reached is None and best >= target:
            reached = spent
    return {"best_at_budget": best, "epochs_to_target": reached, "epochs_used": len(within)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=24, help="training epochs per sweep, over all its trials")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of a trial that runs to its end")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "results", "cache"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "search_efficiency.json"))
    args = parser.parse_args(argv)

    common = [f"task={TASK}", f"data.num_train={args.num_train}", f"data.num_val={args.num_val}",
              f"data.cache_dir={args.cache}", f"train.epochs={args.epochs}", "model.name=resnet18",
              "scaling.num_workers=0", "tune.max_concurrent=1", "mlflow.register_model=false"]
    # Random search spends whole trials; TPE+ASHA gets enough trials to spend the budget (a
    # trial ASHA stops after its first epoch costs one), and its trace is cut at the budget.
    samples = {"random": max(1, args.budget // args.epochs), "tpe+asha": max(2, args.budget // 2)}
    traces: dict[str, dict[int, list[float]]] = {arm: {} for arm in args.arms}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as workdir:
        space, db = os.path.join(workdir, "space.yaml"), os.path.join(workdir, "mlflow.db")
        with open(space, "w") as f:
            f.write(SPACE)
        for i, seed in enumerate(args.seeds):
            arms = args.arms[i % len(args.arms):] + args.arms[:i % len(args.arms)]  # rotated: no arm always first
            for arm in arms:
                sweep = f"search-{arm.replace('/', '-').replace('+', '-')}-{seed}"
                n = samples["random" if arm == "random" else "tpe+asha"]
                wall, _ = run([sys.executable, "-m", "platform.tune", *common, *ARMS[arm], f"tune.num_samples={n}",
                               f"tune.seed={seed}", f"tune.name={sweep}", f"tune.space={space}",
                               f"mlflow.tracking_uri=sqlite:///{db}"], cwd=workdir)
                traces[arm][seed] = trace(db, sweep)
                s = score(traces[arm][seed], args.budget, args.target)
                print(f"seed {seed} {arm}: {n} trials, {len(traces[arm][seed])} epochs, best {METRIC} within "
                      f"{args.budget} epochs {s['best_at_budget']:.4f}, target reached after {s['epochs_to_target']} "
                      f"epochs ({wall:.0f}s)", flush=True)

    summary, rows = {}, []
    for arm in args.arms:
        scores = [score(traces[arm][seed], args.budget, args.target) for seed in args.seeds]
        reached = [s["epochs_to_target"] for s in scores if s["epochs_to_target"] is not None]
        summary[arm] = {
            "best_at_budget": [s["best_at_budget"] for s in scores],
            "median_best_at_budget": median([s["best_at_budget"] for s in scores]),
            "epochs_to_target": [s["epochs_to_target"] for s in scores],
            "seeds_reaching_target": len(reached),
            # Seeds that never reached it count as beyond the budget: the median is then "> budget".
            "median_epochs_to_target": median([s["epochs_to_target"] or float("inf") for s in scores]),
        }
        m = summary[arm]["median_epochs_to_target"]
        rows.append([arm, summary[arm]["median_best_at_budget"], " ".join(f"{v:.3f}" for v in summary[arm]["best_at_budget"]),
                     f"{len(reached)}/{len(args.seeds)}", f"> {args.budget}" if m == float("inf") else m])
    print()
    print(table(["arm", f"best AUC at {args.budget} epochs (median)", "per seed", f"seeds reaching {args.target}",
                 "epochs to reach it (median)"], rows))
    result = {"benchmark": "search_efficiency",
              "command": "python -m benchmarks.search_efficiency " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(args), "space": SPACE, "summary": summary,
              "traces": {arm: {str(seed): t for seed, t in by_seed.items()} for arm, by_seed in traces.items()}}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
