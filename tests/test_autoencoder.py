"""autoencoder: the reconstruction-only baseline, its linear probe, and its encoder handed on by init_from."""

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from platform import config, registry
from platform.data import shards as shards_lib
from tasks.autoencoder import linear_probe
from tests.helpers import overfit_losses, run_cli, run_cli_here, tiny


def test_it_rebuilds_its_input_from_a_bottleneck_and_learns_without_labels(tmp_path):
    task = registry.get("autoencoder")
    cfg = config.build("autoencoder", [{"data.cache_dir": str(tmp_path), "data.num_train": 32, "data.num_val": 8,
                                        "model.encoder": "resnet10t", "model.latent_channels": 4,
                                        "augment.strength": 0.0}])
    batch = task.collate(shards_lib.head(task.build_data(cfg)["train"], 16), cfg, True)
    model = task.build_model(cfg)
    reconstruction = model(batch["image"])
    assert reconstruction.shape == batch["image"].shape  # (B, 1, 64, 64)
    assert model.bottleneck.out_channels == 4 and model.features(batch["image"]).shape == (16, model.encoder.num_features)
    out = task.eval_step(model, batch, cfg)
    assert out["recon_mse"].shape == (16,) and out["features"].shape == (16, model.encoder.num_features)
    # The loss never reads the label: any labels give the same loss.
    shuffled = {**batch, "label": batch["label"].flip(0)}
    assert task.train_step(model, batch, cfg)["loss"] == task.train_step(model, shuffled, cfg)["loss"]
    losses = overfit_losses(task, cfg, batch, steps=30, lr=3e-3)
    assert losses[-1] < 0.2 * losses[0], losses


def test_the_linear_probe_scores_what_the_features_hold_on_images_it_did_not_fit():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    classes = ["no", "sphere", "vort"]
    separable = rng.normal(size=(90, 16)) + 4.0 * np.eye(3, 16)[labels]
    probs = linear_probe(separable, labels, classes, folds=5, c=1.0)
    assert probs.shape == (90, 3) and np.allclose(probs.sum(1), 1)
    assert (probs.argmax(1) == labels).mean() > 0.95
    noise = linear_probe(rng.normal(size=(90, 16)), labels, classes, folds=5, c=1.0)
    assert (noise.argmax(1) == labels).mean() < 0.55  # out of fold: no memorising its way to a score
    # A class with a single image cannot be cross-validated: chance, not an error.
    lonely = linear_probe(separable[:31], labels[:31], classes, folds=5, c=1.0)
    assert np.allclose(lonely, 1 / 3)


def test_evaluate_reports_reconstruction_and_the_probe():
    cfg = config.build("autoencoder", [])
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    outputs = {"recon_mse": np.full(60, 0.25), "label": labels,
               "features": rng.normal(size=(60, 8)) + 5.0 * np.eye(3, 8)[labels]}
    metrics = registry.get("autoencoder").evaluate(outputs, cfg)
    assert metrics["recon_mse"] == 0.25 and metrics["probe_accuracy"] > 0.9 and metrics["probe_auc"] > 0.95
    assert {"probe_auc_no", "probe_auc_sphere", "probe_auc_vort"} <= set(metrics)


def test_a_bad_autoencoder_setting_is_one_line(tmp_path):
    result = run_cli_here("platform.train", "task=autoencoder", "model.latent_channels=0", cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: model.latent_channels=0 is out of range")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_train_the_autoencoder_then_regression_from_its_encoder(tmp_path):
    db = tmp_path / "mlflow.db"
    # Two DDP workers: evaluation reaches the features through DDP's wrapper.
    result = run_cli("platform.train", "task=autoencoder", "train.epochs=2", "scaling.num_workers=2",
                     "scaling.cpus_per_worker=0.5", "model.encoder=resnet10t", *tiny(tmp_path / "cache", db),
                     cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-autoencoder").experiment_id])
    for metric in ("recon_mse", "probe_accuracy", "probe_auc"):
        history = client.get_metric_history(run.info.run_id, f"val/{metric}")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
    assert client.get_metric_history(run.info.run_id, "val/recon_mse")[-1].value < 0.2
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/reconstructions.png", "plots/embeddings.png", "plots/test"}  # test/: the test split's

    regression = run_cli("platform.train", "task=regression", f"init_from={run.info.run_id}", "encoder.arch=resnet10t",
                         "train.epochs=1", "scaling.num_workers=0", *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    out = regression.stdout + regression.stderr
    assert regression.returncode == 0, out[-4000:]
    # Every encoder tensor came from the autoencoder; only the regression head is new.
    assert f"initialised from {run.info.run_id}; 4 tensors not in it: head.0.bias, head.0.weight, head.2.bias" in out
    state = torch.load(client.download_artifacts(run.info.run_id, "checkpoints/best_model.pt", str(tmp_path)),
                       weights_only=True)
    assert any(k.startswith("encoder.") for k in state) and any(k.startswith("bottleneck.") for k in state)
