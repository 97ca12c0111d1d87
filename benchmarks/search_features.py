"""The search's features, measured: a conditional space against the same space flat, and a PBT run.

    python -m benchmarks.search_features [--seeds 0 1 2] [--trials 6] [--epochs 3]

1. ``classification`` on the simulator (64x64, ``--num-train`` training and ``--num-val``
   validation images), a space with a choice of backbone whose options carry their own keys:
   the learning rate, the weight decay, and ResNet-18's dropout, which resnet10t is not given.
   Two arms, the same trials and epochs (TPE and ASHA, the platform's defaults, one trial at a
   time), for every seed (``tune.seed``; the data stay the same):

   - conditional: ``model.drop_rate`` sampled only when ``model.name=resnet18``;
   - flat: the same four keys, the dropout sampled for every trial (resnet10t's too).

   Every validated epoch of every trial is one unit of budget, in the order the epochs ended;
   per sweep the best validation AUC, and the same at half the budget. Medians over seeds.
2. ``classification`` (resnet10t) with ``tune.scheduler=pbt``: ``--pbt-trials`` trials of
   ``--epochs`` + 2 epochs, two at a time, exploiting every epoch; its lineage read back from
   MLflow (each exploited trial's ``platform.pbt.lineage`` tag and ``pbt/train.lr`` history).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from benchmarks.common import ROOT, median, run, save, table
from benchmarks.search_efficiency import score, trace

CONDITIONAL = """search:
  train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  train.weight_decay: {loguniform: [1.0e-5, 1.0e-1]}
  model.name: {choice: [resnet18, resnet10t]}
  model.drop_rate: {uniform: [0.0, 0.5], when: {model.name: [resnet18]}}
"""
FLAT = CONDITIONAL.replace(", when: {model.name: [resnet18]}", "")
PBT_SPACE = """search:
  train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  augment.strength: {uniform: [0.0, 1.0]}
"""


def lineage(db: str, sweep: str) -> list[dict]:
    """Each trial of the PBT sweep: its exploits (tag) and its learning rate's history (metric)."""
    from mlflow.tracking import MlflowClient

    from platform import pbt, tracking
    from platform.runs import sweep_runs

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-classification").experiment_id
    trials = []
    for run_ in sweep_runs(client, experiment, sweep):
        if tracking.TRIAL_TAG not in run_.data.tags:
            continue
        history = client.get_metric_history(run_.info.run_id, pbt.VALUE_METRIC + "train.lr")
        trials.append({"trial": run_.data.tags[tracking.TRIAL_TAG],
                       "exploits": json.loads(run_.data.tags.get(pbt.LINEAGE_TAG, "[]")),
                       "lr_history": sorted((m.step, m.value) for m in history),
                       "best_auc": run_.data.metrics.get("best/auc_macro")})
    return sorted(trials, key=lambda t: t["trial"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=512)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--pbt-trials", type=int, default=4)
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "results", "cache"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "search_features.json"))
    args = parser.parse_args(argv)

    data = [f"data.num_train={args.num_train}", f"data.num_val={args.num_val}", f"data.cache_dir={args.cache}",
            "scaling.num_workers=0", "mlflow.register_model=false", "plots.gradcam=false", "plots.embeddings=false",
            "mlflow.system_metrics_s=0"]
    searched = ["task=classification", f"train.epochs={args.epochs}", f"tune.num_samples={args.trials}",
                "tune.max_concurrent=1", *data]
    budget = args.trials * args.epochs
    traces: dict[str, dict[int, list[float]]] = {"conditional": {}, "flat": {}}
    with tempfile.TemporaryDirectory(prefix="bench-features-") as workdir:
        db = os.path.join(workdir, "mlflow.db")
        spaces = {}
        for arm, text in (("conditional", CONDITIONAL), ("flat", FLAT)):
            spaces[arm] = os.path.join(workdir, f"{arm}.yaml")
            with open(spaces[arm], "w") as f:
                f.write(text)
        for i, seed in enumerate(args.seeds):
            for arm in (["conditional", "flat"] if i % 2 == 0 else ["flat", "conditional"]):  # neither always first
                sweep = f"features-{arm}-{seed}"
                wall, _ = run([sys.executable, "-m", "platform.tune", *searched, f"tune.seed={seed}", f"tune.name={sweep}",
                               f"tune.space={spaces[arm]}", f"mlflow.tracking_uri=sqlite:///{db}"], cwd=workdir)
                traces[arm][seed] = trace(db, sweep)
                s = score(traces[arm][seed], budget, 1.0)
                print(f"seed {seed} {arm}: {len(traces[arm][seed])} epochs, best val/auc_macro {s['best_at_budget']:.4f} "
                      f"({wall:.0f}s)", flush=True)

        pbt_sweep = "features-pbt"
        pbt_space = os.path.join(workdir, "pbt.yaml")
        with open(pbt_space, "w") as f:
            f.write(PBT_SPACE)
        wall, _ = run([sys.executable, "-m", "platform.tune", "task=classification", "model.name=resnet10t",
                       f"train.epochs={args.epochs + 2}", f"tune.num_samples={args.pbt_trials}", "tune.scheduler=pbt",
                       "tune.perturbation_interval=1", f"tune.name={pbt_sweep}", f"tune.space={pbt_space}", *data,
                       f"mlflow.tracking_uri=sqlite:///{db}"], cwd=workdir)
        family = lineage(db, pbt_sweep)

    summary, rows = {}, []
    for arm in traces:
        full = [score(traces[arm][s], budget, 1.0)["best_at_budget"] for s in args.seeds]
        half = [score(traces[arm][s], budget // 2, 1.0)["best_at_budget"] for s in args.seeds]
        summary[arm] = {"best_at_budget": full, "median_best_at_budget": median(full),
                        "best_at_half_budget": half, "median_best_at_half_budget": median(half)}
        rows.append([arm, median(half), median(full), " ".join(f"{v:.3f}" for v in full)])
    print()
    print(table(["arm", f"best AUC at {budget // 2} epochs (median)", f"best AUC at {budget} epochs (median)",
                 "per seed"], rows))
    exploits = sum(len(t["exploits"]) for t in family)
    print(f"\nPBT: {len(family)} trials, {exploits} exploits ({wall:.0f}s)")
    for t in family:
        for e in t["exploits"]:
            print(f"  trial {t['trial']} took trial {e['weights_of']}'s weights at epoch {e['epoch']}: "
                  f"train.lr {e['values'].get('train.lr', float('nan')):.3g}")
    result = {"benchmark": "search_features",
              "command": "python -m benchmarks.search_features " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(args), "budget_epochs": budget, "summary": summary,
              "traces": {arm: {str(s): t for s, t in by_seed.items()} for arm, by_seed in traces.items()},
              "pbt": {"trials": family, "exploits": exploits, "wall_s": wall}}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
