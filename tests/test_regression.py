"""regression: lens parameters from images, shear angle on the circle, init_from another task's encoder."""

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from platform import config, registry
from platform.data import shards as shards_lib
from tasks.regression import angle_error
from platform.runner import data_and_settings
from tests.helpers import overfit_losses, run_cli, run_cli_here, tiny

MAE_SIZE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2"]


def test_shear_angle_error_wraps_at_half_a_turn():
    # 0.05 and pi - 0.05 are 0.1 apart as shears; pi/2 apart is as wrong as it gets.
    assert angle_error(np.array([0.05]), np.array([math.pi - 0.05]))[0] == pytest.approx(0.1)
    assert angle_error(np.array([0.0]), np.array([math.pi / 2]))[0] == pytest.approx(math.pi / 2)


def test_loss_falls_when_overfitting_a_small_batch(tmp_path):
    task = registry.get("regression")
    cfg = config.build("regression", [{"data.cache_dir": str(tmp_path), "data.num_train": 32, "data.num_val": 8,
                                       "encoder.arch": "resnet10t"}])
    splits, cfg = data_and_settings(task, cfg)
    assert len(cfg.targets.mean) == 5 and all(s > 0 for s in cfg.targets.std)  # from the training split
    batch = task.collate(shards_lib.head(splits["train"], 16), cfg, True)
    losses = overfit_losses(task, cfg, batch)
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("init_from, message", [
    ("models:/mae/latest", "error: init_from=models:/mae/latest: there is no MLflow store at sqlite:///"),
    ("/no/such/best_model.pt", "error: init_from=/no/such/best_model.pt: no such run or file"),
    ("", "error: encoder.arch=resnet9000 is neither 'mae' nor a timm model name"),
])
def test_bad_regression_settings_are_one_line(tmp_path, init_from, message):
    extra = [f"init_from={init_from}"] if init_from else ["encoder.arch=resnet9000"]
    result = run_cli_here("platform.train", "task=regression", *extra, cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_regression_from_a_pretrained_mae_against_a_random_start(tmp_path):
    db = tmp_path / "mlflow.db"
    pretrain = run_cli("platform.train", "task=mae", "train.epochs=1", "scaling.num_workers=0", *MAE_SIZE, *tiny(tmp_path / "cache", db),
                       cwd=str(tmp_path))
    assert pretrain.returncode == 0, (pretrain.stdout + pretrain.stderr)[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (mae_run,) = client.search_runs([client.get_experiment_by_name("deeplense-mae").experiment_id])

    # The encoder's size comes from the mae run: only encoder.arch=mae is said.
    result = run_cli("platform.train", "task=regression", "train.epochs=2", "init_from=models:/mae/latest",
                     "encoder.arch=mae", "encoder.freeze=true", "train.compare_random_init=true", "train.name=cmp",
                     "scaling.num_workers=0",
                     *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "initialised from models:/mae/latest" in out and "encoder.mae.depth=1 encoder.mae.embed_dim=32" in out
    experiment = client.get_experiment_by_name("deeplense-regression").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert set(runs) == {"cmp", "cmp-pretrained", "cmp-random_init"}
    parent, pretrained, random_init = runs["cmp"], runs["cmp-pretrained"], runs["cmp-random_init"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert {pretrained.data.tags["mlflow.parentRunId"], random_init.data.tags["mlflow.parentRunId"]} == {parent.info.run_id}
    # The UI links the pretrained run to the mae run; the baseline starts from nothing and trains its encoder.
    assert pretrained.data.tags["platform.init_run_id"] == mae_run.info.run_id
    assert pretrained.data.params["init_from"] == "models:/mae/latest" and pretrained.data.params["encoder.freeze"] == "True"
    assert "platform.init_run_id" not in random_init.data.tags and random_init.data.params["init_from"] == ""
    assert random_init.data.params["encoder.freeze"] == "False"
    same_budget = ("train.epochs", "train.lr", "train.batch_size", "train.seed", "data.num_train", "encoder.mae.depth")
    assert all(pretrained.data.params[k] == random_init.data.params[k] for k in same_budget)
    for run in (pretrained, random_init):
        for metric in ("mae_mean", "mae_theta_e", "mae_source_x", "mae_source_y", "mae_ellipticity", "mae_shear",
                       "mae_shear_angle"):
            history = client.get_metric_history(run.info.run_id, f"val/{metric}")
            assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
        assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/predicted_vs_true.png",
                                                                                    "plots/embeddings.png", "plots/test"}
        assert math.isfinite(run.data.metrics["test/mae_mean"])  # each side of the comparison scored on test once
    assert set(parent.data.metrics) == {"pretrained/best_mae_mean", "random_init/best_mae_mean"}
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/pretrained_vs_random_init.png"]


def test_a_random_start_comparison_needs_init_from_and_is_not_for_sweeps(tmp_path):
    result = run_cli_here("platform.train", "task=regression", "train.compare_random_init=true", cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: train.compare_random_init=true compares"), result.stderr
    result = run_cli_here("platform.tune", "task=regression", "train.compare_random_init=true", cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: train.compare_random_init=true is for"), result.stderr
    assert not (tmp_path / "mlflow.db").exists()
