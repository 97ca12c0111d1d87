"""mae_finetune: the mae encoder under a classification or super-resolution head, linked to its pretraining run."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from platform import config, registry
from platform.data import shards as shards_lib
from tests.helpers import assert_figure, overfit_losses, run_cli, run_cli_here, tiny

MAE_SIZE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_dim=32",
            "model.decoder_depth=1"]
SMALL = {"model.depth": 1, "model.embed_dim": 32, "model.num_heads": 2, "model.decoder_dim": 32,
         "model.decoder_depth": 1}


def test_the_superres_head_starts_exactly_at_bicubic():
    cfg = config.build("mae_finetune", [{**SMALL, "head": "superres"}])
    model = registry.get("mae_finetune").build_model(cfg)
    lr = torch.rand(2, 1, 32, 32)  # (B, 1, h, w)
    sr = model(lr)  # (B, 1, 2h, 2w): the factor comes from degrade.factor
    bicubic = F.interpolate(lr, size=(64, 64), mode="bicubic", align_corners=False)
    assert sr.shape == (2, 1, 64, 64) and torch.equal(sr, bicubic)


def test_each_head_is_its_own_registration_chosen_by_the_head_setting(monkeypatch):
    classifier, superres = (config.build("mae_finetune", [{**SMALL, "head": head}]) for head in ("classification", "superres"))
    assert registry.task_of(classifier).objective(classifier) == "auc_macro"
    assert registry.task_of(superres).objective(superres) == "psnr" and registry.task_of(superres).gradcam is None
    assert registry.get("mae_finetune") is registry.task_of(classifier)  # the default head answers for the name
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))  # the demo names go with the test
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    plain = registry.register(dataclasses.replace(registry.task_of(superres), name="demo", when=None))
    with pytest.raises(registry.DuplicateTaskError, match="several registrations of one name need when="):
        registry.register(dataclasses.replace(plain, when=("head", "superres")))


def test_the_encoder_gets_no_gradient_during_the_frozen_warm_up(tmp_path):
    task = registry.get("mae_finetune")
    cfg = config.build("mae_finetune", [{**SMALL, "data.cache_dir": str(tmp_path), "data.num_train": 16,
                                         "data.num_val": 8, "finetune.freeze_epochs": 1}])
    # Unaugmented: the same batch whatever random state earlier tests left.
    batch = task.collate(shards_lib.head(task.build_data(cfg)["train"], 8), cfg, False)
    model = task.build_model(cfg)
    for epoch, encoder_learns in ((0, False), (1, True)):
        model.zero_grad(set_to_none=True)
        task.train_step(model, {**batch, "epoch": epoch}, cfg)["loss"].backward()
        assert (model.encoder.patch_embed.proj.weight.grad is not None) == encoder_learns
        assert model.head[1].weight.grad is not None
    assert model.encoder.decoder_embed.weight.grad is None  # the MAE decoder is never trained

    # A ViT on mean-pooled tokens of near-alike images learns slower than a CNN: more steps, a larger lr.
    losses = overfit_losses(task, cfg, batch, steps=40, lr=3e-3, epoch=1)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("setting, message", [
    ("head=segmentation", "error: head=segmentation is not allowed; expected one of classification|superres"),
    ("finetune.freeze_epochs=-1", "error: finetune.freeze_epochs=-1 is out of range"),
    ("init_from=/no/such/best_model.pt", "error: init_from=/no/such/best_model.pt: no such run or file"),
])
def test_bad_finetune_settings_are_one_line(tmp_path, setting, message):
    result = run_cli_here("platform.train", "task=mae_finetune", setting, cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_pretrain_then_finetune_both_heads_linked_in_mlflow(tmp_path):
    db = tmp_path / "mlflow.db"
    pretrain = run_cli("platform.train", "task=mae", "train.epochs=1", "scaling.num_workers=0", *MAE_SIZE,
                       *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert pretrain.returncode == 0, (pretrain.stdout + pretrain.stderr)[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (mae_version,) = client.search_model_versions("name='mae'")

    # The README's chain: the second sweep names the first one's registered model and nothing else about it.
    sweep = run_cli("platform.tune", "task=mae_finetune", "scaling.num_workers=0",
                    "init_from=models:/mae/latest", "tune.num_samples=1",
                    "train.epochs=2", "tune.name=ft", *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    out = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, out[-4000:]
    assert "model.depth=1 model.embed_dim=32" in out  # the encoder's size, read from the mae run
    experiment = client.get_experiment_by_name("deeplense-mae_finetune").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'ft'")
    assert len(runs) == 2 and all(r.data.tags["platform.init_run_id"] == mae_version.run_id for r in runs)
    (trial,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert trial.data.params["init_from"] == "models:/mae/latest" and trial.info.status == "FINISHED"
    for metric in ("auc_macro", "accuracy", "auc_no", "auc_sphere", "auc_vort"):
        history = client.get_metric_history(trial.info.run_id, f"val/{metric}")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
    assert {a.path for a in client.list_artifacts(trial.info.run_id, "plots")} == {
        "plots/roc.png", "plots/confusion_matrix.png", "plots/gradcam.png", "plots/embeddings.png", "plots/test"}
    assert_figure(client, trial.info.run_id, "plots/gradcam.png")  # the ViT's tokens laid out as a grid

    result = run_cli("platform.train", "task=mae_finetune", "head=superres", f"init_from={mae_version.run_id}",
                     "train.epochs=1", "data.preset=model_ii", "scaling.num_workers=0", *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (run,) = client.search_runs([experiment], filter_string="params.head = 'superres'")
    assert run.data.tags["platform.init_run_id"] == mae_version.run_id
    for metric in ("psnr", "ssim", "mse", "bicubic_psnr", "bicubic_ssim", "bicubic_mse"):
        (value,) = client.get_metric_history(run.info.run_id, f"val/{metric}")
        assert math.isfinite(value.value), metric
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/panels.png",
                                                                                 "plots/power_spectrum.png"}
