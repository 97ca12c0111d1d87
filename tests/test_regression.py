"""regression: lens parameters from images, shear angle on the circle, init_from another task's encoder."""

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from platform import config, registry
from platform.data import shards as shards_lib
from tasks.regression import angle_error
from tests.helpers import overfit_losses, run_cli, tiny

MAE_SIZE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2"]
ENCODER_SIZE = ["encoder.arch=mae", "encoder.mae.depth=1", "encoder.mae.embed_dim=32", "encoder.mae.num_heads=2"]


def test_shear_angle_error_wraps_at_half_a_turn():
    # 0.05 and pi - 0.05 are 0.1 apart as shears; pi/2 apart is as wrong as it gets.
    assert angle_error(np.array([0.05]), np.array([math.pi - 0.05]))[0] == pytest.approx(0.1)
    assert angle_error(np.array([0.0]), np.array([math.pi / 2]))[0] == pytest.approx(math.pi / 2)


def test_loss_falls_when_overfitting_a_small_batch(tmp_path):
    task = registry.get("regression")
    cfg = config.build("regression", [{"data.cache_dir": str(tmp_path), "data.num_train": 32, "data.num_val": 8,
                                       "encoder.arch": "resnet10t"}])
    splits = task.build_data(cfg)
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
    result = run_cli("platform.train", "task=regression", *extra, cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_regression_from_a_pretrained_mae_by_model_and_by_run_id(tmp_path):
    db = tmp_path / "mlflow.db"
    pretrain = run_cli("platform.train", "task=mae", "train.epochs=1", *MAE_SIZE, *tiny(tmp_path / "cache", db),
                       cwd=str(tmp_path))
    assert pretrain.returncode == 0, (pretrain.stdout + pretrain.stderr)[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (mae_run,) = client.search_runs([client.get_experiment_by_name("deeplense-mae").experiment_id])

    result = run_cli("platform.train", "task=regression", "train.epochs=2", "init_from=models:/mae/latest",
                     "encoder.freeze=true", *ENCODER_SIZE, *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "initialised from models:/mae/latest" in out
    experiment = client.get_experiment_by_name("deeplense-regression").experiment_id
    (run,) = client.search_runs([experiment])
    assert run.data.tags["platform.init_run_id"] == mae_run.info.run_id  # the UI links the two runs
    assert run.data.params["init_from"] == "models:/mae/latest"
    for metric in ("mae_mean", "mae_theta_e", "mae_source_x", "mae_source_y", "mae_ellipticity", "mae_shear",
                   "mae_shear_angle"):
        history = client.get_metric_history(run.info.run_id, f"val/{metric}")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/predicted_vs_true.png"]

    sweep = run_cli("platform.tune", "task=regression", "tune.num_samples=1", "train.epochs=1", "tune.name=reg",
                    f"init_from={mae_run.info.run_id}", *ENCODER_SIZE, *tiny(tmp_path / "cache", db),
                    cwd=str(tmp_path))
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-4000:]
    runs = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'reg'")
    assert len(runs) == 2 and all(r.data.tags["platform.init_run_id"] == mae_run.info.run_id for r in runs)
