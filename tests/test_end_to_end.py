"""The user's commands, for real: local Ray, Ray Train, Ray Tune with Optuna, MLflow on sqlite."""

import os

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, tiny

pytestmark = pytest.mark.slow


def runs_of(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name}"
    return client.search_runs([experiment.experiment_id])


def artifact_paths(client, run_id, folder=""):
    paths = []
    for item in client.list_artifacts(run_id, folder):
        paths += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return paths


def test_train_classification(tmp_path):
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.train", "task=classification", "train.epochs=2",
                     *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "best val/auc_macro = " in result.stdout and "mlflow ui --backend-store-uri sqlite:///" in result.stdout

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = runs_of(client, "deeplense-classification")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.name"] == "resnet18"
    for metric in ("val/auc_macro", "val/accuracy", "val/auc_vort", "train/loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == [1, 2], (metric, steps)
    artifacts = artifact_paths(client, run.info.run_id)
    for expected in ("plots/roc.png", "plots/confusion_matrix.png", "checkpoints/best_model.pt", "config.yaml"):
        assert expected in artifacts, artifacts
    assert any(p.startswith("model") for p in artifacts) or client.search_logged_models([run.info.experiment_id])
    (version,) = client.search_model_versions("name='classification'")
    assert version.run_id == run.info.run_id


def test_tune_mae_sweep(tmp_path):
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.tune", "task=mae", "tune.num_samples=2", "train.epochs=2", "tune.name=sweep-a",
                     "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                     *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 trials (0 failed). Best trial" in result.stdout and "model.mask_ratio = " in result.stdout

    client = MlflowClient(f"sqlite:///{db}")
    runs = runs_of(client, "deeplense-mae")
    (parent,) = [r for r in runs if r.data.tags.get("platform.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-a"
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert 0.5 <= float(child.data.params["model.mask_ratio"]) <= 0.9
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/loss")]
        assert steps[0] == 1 and steps == sorted(set(steps)), steps  # ASHA may stop a trial after epoch 1
        assert "plots/reconstructions.png" in artifact_paths(client, child.info.run_id)
    best_run = parent.data.tags["platform.best_run_id"]
    assert best_run in {c.info.run_id for c in children}
    best_child = client.get_run(best_run)
    assert parent.data.metrics["best/loss"] == pytest.approx(min(c.data.metrics["best/loss"] for c in children))
    assert parent.data.metrics["best/loss"] == pytest.approx(best_child.data.metrics["best/loss"])
    (version,) = client.search_model_versions("name='mae'")
    assert version.run_id == best_run
    assert os.path.exists(tmp_path / "ray_results" / "sweep-a" / "optuna.db")
