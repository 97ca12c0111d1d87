"""lens_finding: imbalanced simulated data, weighted BCE, a tuned threshold, through the real CLIs."""

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from platform import config, registry
from platform.data import shards as shards_lib
from platform.data.lenses import simulate_lenses
from platform.metrics import binary_metrics
from platform.runner import data_and_settings
from tests.helpers import assert_figure, overfit_losses, run_cli, run_cli_here

# Tiny, and with enough lenses in validation for an AUC: 30 images at 1:4.
TINY = ["data.num_train=48", "data.num_val=30", "sim.val_positive_fraction=0.2", "train.batch_size=16",
        "model.name=resnet10t"]


def test_simulated_lenses_are_deterministic_and_as_imbalanced_as_asked():
    images, truth = simulate_lenses(170, 1 / 17, seed=3)
    assert images.shape == (170, 3, 64, 64) and images.dtype == np.float32
    assert truth["label"].sum() == 10 and np.isfinite(images).all() and images.min() >= 0
    assert (truth["theta_e"][truth["label"] == 1] > 0).all() and (truth["theta_e"][truth["label"] == 0] == 0).all()
    again, _ = simulate_lenses(170, 1 / 17, seed=3)
    assert np.array_equal(images, again)


def test_threshold_is_tuned_for_f1():
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    m = binary_metrics(scores, labels)
    # At 0.35: 3 lenses and 1 non-lens above it, F1 6/7; at 0.8 precision is perfect but F1 only 0.8.
    assert m["threshold"] == pytest.approx(0.35) and m["precision"] == 0.75 and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(6 / 7) and m["roc_auc"] == pytest.approx(11 / 12)
    # On the test split, the threshold chosen on val is applied as it is: at 0.8, two of three lenses.
    fixed = binary_metrics(scores, labels, threshold=0.8)
    assert fixed["threshold"] == 0.8 and fixed["precision"] == 1.0 and fixed["recall"] == pytest.approx(2 / 3)
    assert fixed["roc_auc"] == m["roc_auc"]
    # Recall at a 1% false-positive rate: above 0.4 no non-lens, and two of three lenses (0.8, 0.9).
    assert m["recall_at_1pct_fpr"] == fixed["recall_at_1pct_fpr"] == pytest.approx(2 / 3)
    many = binary_metrics(np.arange(201) / 200, np.r_[np.zeros(150), np.ones(51)].astype(int))
    assert many["recall_at_1pct_fpr"] == 1.0  # every lens scores above every non-lens


def test_loss_falls_when_overfitting_a_small_batch(tmp_path):
    task = registry.get("lens_finding")
    cfg = config.build("lens_finding", [{"data.cache_dir": str(tmp_path), "data.num_train": 32, "data.num_val": 20,
                                         "sim.val_positive_fraction": 0.2, "augment.strength": 0.0,
                                         "model.name": "resnet10t"}])
    assert cfg.loss.pos_weight is None
    splits, cfg = data_and_settings(task, cfg)
    assert cfg.loss.pos_weight == pytest.approx(30 / 2)  # the training split's negatives per lens, as a config layer
    batch = task.collate(shards_lib.head(splits["train"], 16), cfg, True)
    losses = overfit_losses(task, cfg, batch)
    assert losses[-1] < 0.3 * losses[0], losses


def test_a_negative_pos_weight_is_one_line(tmp_path):
    result = run_cli_here("platform.train", "task=lens_finding", "loss.pos_weight=-1", cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: loss.pos_weight=-1.0 is out of range; expected 0.0 < loss.pos_weight"


@pytest.mark.slow
def test_tune_lens_finding_through_the_cli(tmp_path):
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.tune", "task=lens_finding", "scaling.num_workers=0",
                     "tune.num_samples=1", "train.epochs=2", "tune.name=lf",
                     *TINY, f"data.cache_dir={tmp_path}/cache", f"mlflow.tracking_uri=sqlite:///{db}", cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "1 trials (0 failed)" in result.stdout and "loss.pos_weight = " in result.stdout
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-lens_finding").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'lf'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    (trial,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert 1.0 <= float(trial.data.params["loss.pos_weight"]) <= 32.0  # searched, not the data's default
    for metric in ("roc_auc", "pr_auc", "recall_at_1pct_fpr", "precision", "recall", "f1", "threshold"):
        history = client.get_metric_history(trial.info.run_id, f"val/{metric}")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
    plots = {a.path for a in client.list_artifacts(trial.info.run_id, "plots")}
    assert plots == {"plots/roc.png", "plots/pr.png", "plots/gradcam.png", "plots/embeddings.png", "plots/test"}
    assert_figure(client, trial.info.run_id, "plots/gradcam.png")

    # The test split, scored once for the best trial, at the threshold the trial chose on val.
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    at_best = [m.value for m in client.get_metric_history(trial.info.run_id, "val/threshold")
               if str(m.step) == trial.data.tags["platform.best_epoch"]]
    assert trial.data.metrics["test/threshold"] == pytest.approx(at_best[-1])
    for metric in ("roc_auc", "pr_auc", "recall_at_1pct_fpr", "precision", "recall", "f1"):
        assert len(client.get_metric_history(trial.info.run_id, f"test/{metric}")) == 1
        assert parent.data.metrics[f"test/{metric}"] == trial.data.metrics[f"test/{metric}"]
    note = parent.data.tags["mlflow.note.content"]
    assert f"test/roc_auc = {trial.data.metrics['test/roc_auc']:.4f}" in note
    assert f"python -m platform.train from_run={trial.info.run_id}" in note

    # New cutouts, unlabelled: a score each, and the verdict at that same threshold.
    rng = np.random.default_rng(5)
    (tmp_path / "cutouts").mkdir()
    for i in range(6):
        np.save(tmp_path / "cutouts" / f"c{i}.npy", rng.random((3, 64, 64)).astype(np.float32))
    found = run_cli_here("platform.predict", "model=models:/lens_finding/latest", f"data.path={tmp_path}/cutouts",
                         f"evaluate.out={tmp_path}/lenses.csv", f"mlflow.tracking_uri=sqlite:///{db}", cwd=str(tmp_path))
    assert found.returncode == 0, found.stderr
    table = pd.read_csv(tmp_path / "lenses.csv")
    assert list(table["file"]) == [f"c{i}.npy" for i in range(6)]
    assert list(table["is_lens"]) == list(table["lens_score"] >= at_best[-1])


@pytest.mark.slow
def test_a_sweep_resumed_without_its_pos_weight_is_refused(tmp_path):
    """loss.pos_weight given when the sweep started; left out when it is resumed, the data would
    decide another (the negatives per lens): the restored trials would train with another weight."""
    db = tmp_path / "mlflow.db"
    (tmp_path / "lr.yaml").write_text("search:\n  train.lr: {loguniform: [3.0e-4, 3.0e-3]}\n")
    common = ["task=lens_finding", "scaling.num_workers=0", "tune.num_samples=1", "train.epochs=1", "tune.name=pw",
              "tune.space=lr.yaml", *TINY, f"data.cache_dir={tmp_path}/cache", f"mlflow.tracking_uri=sqlite:///{db}"]
    result = run_cli("platform.tune", *common, "loss.pos_weight=5", cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    result = run_cli("platform.tune", *common, "tune.resume=force", cwd=str(tmp_path))
    assert result.returncode == 2, (result.stdout + result.stderr)[-4000:]
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0], result.stderr
    assert "error: tune.name=pw was started with loss.pos_weight=5.0; this command has loss.pos_weight=" in result.stderr
    # With its own weight it is the same sweep again: one more trial.
    result = run_cli("platform.tune", *common, "loss.pos_weight=5", "tune.resume=force", cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # Each kept trial's test split scored once, however many times the sweep ended: never twice.
    client = MlflowClient(f"sqlite:///{db}")
    trials = [r for r in client.search_runs([client.get_experiment_by_name("deeplense-lens_finding").experiment_id])
              if "platform.trial_id" in r.data.tags]
    scored = [len(client.get_metric_history(t.info.run_id, "test/roc_auc")) for t in trials]
    assert len(trials) == 2 and 1 <= sum(scored) <= 2 and max(scored) == 1, scored
