"""multitask: one encoder, a classifier and a decoder, through the real CLIs; its encoder feeds regression."""

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from platform import config, registry
from platform.data import shards as shards_lib
from tests.helpers import assert_figure, overfit_losses, run_cli, run_cli_here, tiny


def test_the_decoder_rebuilds_the_input_size_and_the_loss_weights_reconstruction(tmp_path):
    task = registry.get("multitask")
    cfg = config.build("multitask", [{"data.cache_dir": str(tmp_path), "data.num_train": 32, "data.num_val": 8,
                                      "model.encoder": "resnet10t", "augment.strength": 0.0}])
    splits = task.build_data(cfg)
    batch = task.collate(shards_lib.head(splits["train"], 16), cfg, True)
    model = task.build_model(cfg)
    logits, reconstruction = model(batch["image"])
    assert logits.shape == (16, 3) and reconstruction.shape == batch["image"].shape  # (B, 1, 64, 64)
    torch.manual_seed(0)
    classification_only = task.train_step(model, batch, config.build("multitask", [{"loss.recon_weight": 0.0,
                                                                                     "model.encoder": "resnet10t"}]))
    torch.manual_seed(0)
    weighted = task.train_step(model, batch, config.build("multitask", [{"loss.recon_weight": 100.0,
                                                                         "model.encoder": "resnet10t"}]))
    assert weighted["loss"] > classification_only["loss"]

    losses = overfit_losses(task, cfg, batch)
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("setting, message", [
    ("loss.recon_weight=-1", "error: loss.recon_weight=-1.0 is out of range; expected 0.0 <= loss.recon_weight"),
    ("model.encoder=resnet9000", "error: model.encoder=resnet9000 is not a timm model name"),
])
def test_bad_multitask_settings_are_one_line(tmp_path, setting, message):
    result = run_cli_here("platform.train", "task=multitask", setting, cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_tune_multitask_then_regression_from_its_encoder(tmp_path):
    db = tmp_path / "mlflow.db"
    sweep = run_cli("platform.tune", "task=multitask", "scaling.num_workers=0",
                    "tune.num_samples=1", "train.epochs=2", "tune.name=mt",
                    "model.encoder=resnet10t", *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-multitask").experiment_id
    (trial,) = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    assert trial.info.status == "FINISHED"
    for metric in ("auc_macro", "accuracy", "auc_no", "auc_sphere", "auc_vort", "recon_mse"):
        history = client.get_metric_history(trial.info.run_id, f"val/{metric}")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
    plots = {a.path for a in client.list_artifacts(trial.info.run_id, "plots")}
    assert plots == {"plots/roc.png", "plots/confusion_matrix.png", "plots/reconstructions.png", "plots/gradcam.png",
                     "plots/embeddings.png", "plots/test"}
    assert_figure(client, trial.info.run_id, "plots/gradcam.png")

    # The registered multitask model's encoder starts a regression run.
    result = run_cli("platform.train", "task=regression", "train.epochs=1", "init_from=models:/multitask/latest",
                     "encoder.arch=resnet10t", "scaling.num_workers=0", *tiny(tmp_path / "cache", db),
                     cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-regression").experiment_id])
    assert run.data.tags["platform.init_run_id"] == trial.info.run_id
    out = result.stdout
    new = out.split("tensors not in it: ", 1)[1].splitlines()[0]
    assert new.startswith("head.") and "encoder" not in new, new  # the whole encoder came from multitask
