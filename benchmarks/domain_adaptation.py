"""Domain adaptation, measured on a domain shift inside the simulator: a lens finder trained on one
preset and used on another, source-only against DANN against CORAL.

    python -m benchmarks.domain_adaptation [--seeds 0 1 2] [--epochs 4] [--num-train 2048]

- Source (labelled): ``lens_finding`` with ``data.preset=ideal``: 0.2"/px, the three bands over one
  maximum, little noise, no neighbours, at the task's training mix (1 lens in 17).
- Target: ``data.preset=hsc``: 0.168"/px, other PSFs, each band min-max normalised, the real sky's
  noise, neighbours, other lens and galaxy populations. ``--num-target`` of its images, without their
  labels, are ``adapt.path``; a labelled folder in DeepLense's layout (``test_lenses/``,
  ``test_nonlenses/``, ``--num-target-test`` images, half of them lenses, drawn apart from the
  unlabelled ones) is what ``python -m platform.evaluate`` scores every model on, once.
- For each seed (``data.seed`` and ``train.seed``): three ``platform.train`` runs that differ only in
  ``adapt.method`` (none, dann, coral; ``adapt.weight`` ``--dann-weight`` and ``--coral-weight``).
  Each run keeps its best epoch on the source's val split: the target has no labels to choose by.

- ``oracle``: the same training on the target's preset itself, labels and all: the ceiling that
  adaptation works toward (its "source test" is then the target's own simulated test split).

Reported: each arm's target test ROC AUC (and PR AUC), the median over seeds; and the source test
ROC AUC the same models reach on their own domain. ``--arms`` runs some of them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

import numpy as np

from benchmarks.common import ROOT, median, run, save, table

ARMS = ("none", "dann", "coral", "oracle")  # oracle: trained on the target's own preset, with its labels


def write_target(folder: str, n_unlabelled: int, n_test: int, seed: int) -> tuple[str, str]:
    """(unlabelled folder, labelled DeepLense folder) of hsc-preset images."""
    from platform.data.lenses import simulate_lenses

    unlabelled, labelled = os.path.join(folder, "unlabelled"), os.path.join(folder, "labelled")
    images, _ = simulate_lenses(n_unlabelled, 1 / 17, seed=seed, preset="hsc")  # the survey's own mix
    os.makedirs(unlabelled)
    for i, image in enumerate(images):
        np.save(os.path.join(unlabelled, f"cutout_{i:05d}.npy"), image)
    images, truth = simulate_lenses(n_test, 0.5, seed=seed + 1, preset="hsc")
    # A handful of training files only because the layout wants them; evaluation reads test_*.
    train, _ = simulate_lenses(8, 0.5, seed=seed + 2, preset="hsc")
    for split, split_images, labels in (("test", images, truth["label"]), ("train", train, np.arange(8) % 2)):
        for name, label in (("lenses", 1), ("nonlenses", 0)):
            os.makedirs(os.path.join(labelled, f"{split}_{name}"))
            for i in np.flatnonzero(labels == label):
                np.save(os.path.join(labelled, f"{split}_{name}", f"{name}_{i:05d}.npy"), split_images[i])
    return unlabelled, labelled


def metric(output: str, name: str) -> float:
    found = re.findall(rf"{re.escape(name)} = ([0-9.eE+-]+|nan)", output)
    if not found:
        raise RuntimeError(f"no {name} in the output:\n{output[-3000:]}")
    return float(found[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-val", type=int, default=512)
    parser.add_argument("--num-target", type=int, default=2048)
    parser.add_argument("--num-target-test", type=int, default=400)
    parser.add_argument("--dann-weight", type=float, default=0.3)
    parser.add_argument("--coral-weight", type=float, default=1.0)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "results", "cache"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "domain_adaptation.json"))
    args = parser.parse_args(argv)

    common = ["task=lens_finding", f"model.name={args.model}", f"train.epochs={args.epochs}",
              f"data.num_train={args.num_train}", f"data.num_val={args.num_val}", "sim.val_positive_fraction=0.1",
              f"data.cache_dir={args.cache}", "scaling.num_workers=0", "mlflow.register_model=false",
              "plots.gradcam=false", "plots.embeddings=false", "mlflow.system_metrics_s=0"]
    arm_settings = {"none": ["data.preset=ideal", "adapt.method=none"],
                    "dann": ["data.preset=ideal", "adapt.method=dann", f"adapt.weight={args.dann_weight}"],
                    "coral": ["data.preset=ideal", "adapt.method=coral", f"adapt.weight={args.coral_weight}"],
                    "oracle": ["data.preset=hsc", "adapt.method=none"]}
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory(prefix="bench-adapt-") as workdir:
        db = f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"
        unlabelled, labelled = write_target(workdir, args.num_target, args.num_target_test, seed=1000)
        for seed in args.seeds:
            for arm in args.arms:
                wall, out = run([sys.executable, "-m", "platform.train", *common, f"data.seed={seed}",
                                 f"train.seed={seed}", f"adapt.path={unlabelled}", *arm_settings[arm],
                                 f"train.name=adapt-{arm}-{seed}", f"mlflow.tracking_uri={db}"], cwd=workdir)
                run_id = re.findall(r"MLflow run ([0-9a-f]{32})", out)[-1]
                _, scored = run([sys.executable, "-m", "platform.evaluate", f"model={run_id}", f"data.path={labelled}",
                                 "data.source=folder", f"mlflow.tracking_uri={db}"], cwd=workdir)
                row = {"seed": seed, "run_id": run_id, "train_s": wall,
                       "source_val_roc_auc": metric(out, "best val/roc_auc"),
                       "source_test_roc_auc": metric(out, "test/roc_auc"),
                       "target_test_roc_auc": metric(scored, "test/roc_auc"),
                       "target_test_pr_auc": metric(scored, "test/pr_auc")}
                results[arm].append(row)
                print(f"seed {seed} {arm:>5}: target test ROC AUC {row['target_test_roc_auc']:.4f} "
                      f"(source test {row['source_test_roc_auc']:.4f}; {wall:.0f}s)", flush=True)

    rows, summary = [], {}
    for arm in args.arms:
        target = [r["target_test_roc_auc"] for r in results[arm]]
        summary[arm] = {"median_target_test_roc_auc": median(target),
                        "median_target_test_pr_auc": median([r["target_test_pr_auc"] for r in results[arm]]),
                        "median_source_test_roc_auc": median([r["source_test_roc_auc"] for r in results[arm]])}
        rows.append([arm, summary[arm]["median_target_test_roc_auc"], " ".join(f"{v:.3f}" for v in target),
                     summary[arm]["median_target_test_pr_auc"], summary[arm]["median_source_test_roc_auc"]])
    print()
    print(table(["adapt.method", "target test ROC AUC (median)", "per seed", "target PR AUC (median)",
                 "source test ROC AUC (median)"], rows))
    result = {"benchmark": "domain_adaptation",
              "command": "python -m benchmarks.domain_adaptation " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(args), "summary": summary, "runs": results}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
