"""The training loop's own promises, on real Ray Train workers (the session's Ray head) and in unit form:
each rank draws its own random numbers from the same initial weights; every val row is scored once,
whatever the number of workers; a NaN metric never becomes the best."""

import json
import math
import os

import pytest

from platform import config as config_lib
from platform import loop, registry

MAE = {"model.depth": 1, "model.embed_dim": 32, "model.num_heads": 2, "model.decoder_dim": 32,
       "model.decoder_depth": 1}


def fit(task: str, overrides: dict, probe, workers: int, out) -> None:
    """``probe`` on ``workers`` Ray Train workers of the session's head, given the loop's own config."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from platform import cluster
    from platform.data.batches import EveryEvaluationRow
    from platform.runner import loop_config, put_in_memory, streamed

    cfg = config_lib.build(task, [overrides])
    shards = registry.get(task).build_data(cfg)
    cluster.connect()
    try:
        in_memory = put_in_memory(cfg, shards)
        config = {**loop_config(cfg, shards, mlflow_run_id=None, tracking_uri="", in_memory=in_memory), "out": str(out)}
        result = TorchTrainer(probe, train_loop_config=config, datasets=streamed(shards, in_memory),
                              dataset_config=EveryEvaluationRow(),
                              scaling_config=ray.train.ScalingConfig(num_workers=workers)).fit()
    finally:
        ray.shutdown()
    assert result.error is None, result.error


def record_masks(config):
    """One real epoch of the MAE on this rank, its masks recorded as the model draws them."""
    run = loop.setup(config, loop.ray_train_session())
    mae = loop.unwrap(run.model)
    draw, masks = mae.random_masking, []

    def recorded(*args, **kwargs):
        kept, mask, restore = draw(*args, **kwargs)
        masks.append(mask.int().tolist())
        return kept, mask, restore

    mae.random_masking = recorded
    weights = sum(float(p.double().sum()) for p in mae.parameters())
    loop.train_epoch(run, 0)
    with open(os.path.join(config["out"], f"rank{run.rank}.json"), "w") as f:
        json.dump({"masks": masks, "initial_weights": weights}, f)


def record_validation(config):
    run = loop.setup(config, loop.ray_train_session())
    validated = loop.validate(run)
    if run.rank == 0:
        with open(os.path.join(config["out"], f"{run.world_size}.json"), "w") as f:
            json.dump({"metrics": validated.metrics, "rows": len(validated.outputs["label"])}, f)


@pytest.mark.slow
def test_each_rank_draws_its_own_masks_from_the_same_initial_weights(tmp_path):
    fit("mae", {**MAE, "data.cache_dir": str(tmp_path / "cache"), "data.num_train": 32, "data.num_val": 8,
                "train.batch_size": 8}, record_masks, 2, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["initial_weights"] == ranks[1]["initial_weights"]
    assert len(ranks[0]["masks"]) == len(ranks[1]["masks"]) == 2  # 16 training rows each, 2 steps
    for step in range(2):  # N workers must not train on N copies of the same masks
        assert ranks[0]["masks"][step] != ranks[1]["masks"][step], step


@pytest.mark.slow
def test_the_same_weights_score_the_same_on_one_and_two_workers(tmp_path):
    # 45 val rows: two workers cannot split them equally, and none may be dropped. One worker
    # reads them from the object store, two stream them through Ray Data (in_memory_mb=0).
    settings = {"data.cache_dir": str(tmp_path / "cache"), "data.num_train": 16, "data.num_val": 45,
                "train.batch_size": 8, "plots.gradcam": False}
    fit("classification", settings, record_validation, 1, tmp_path)
    fit("classification", {**settings, "data.in_memory_mb": 0}, record_validation, 2, tmp_path)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert one["rows"] == two["rows"] == 45
    assert one["metrics"].keys() == two["metrics"].keys()
    for name, value in one["metrics"].items():
        assert math.isclose(value, two["metrics"][name], rel_tol=1e-5, abs_tol=1e-6), (name, value, two["metrics"][name])


def test_a_nan_metric_never_becomes_the_best():
    assert loop.is_better(0.5, None, "max") and loop.is_better(0.4, 0.5, "min")
    assert not loop.is_better(math.nan, None, "max") and not loop.is_better(math.nan, 0.1, "min")
    best = None
    for value in (math.nan, 0.3, math.nan, 0.2):  # epoch 1 NaN: the best is still found later
        if loop.is_better(value, best, "max"):
            best = value
    assert best == 0.3


def test_checkpoints_are_spaced_by_what_they_cost():
    import time
    import types

    import torch

    def run_with(every, **state):
        model = torch.nn.Linear(1000, 1000)  # 4 MB of weights
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 1000)).sum().backward()
        optimizer.step()  # its two moments: 8 MB more
        cfg = config_lib.build("mae", [{"train.checkpoint_every": every}])
        return types.SimpleNamespace(**{"cfg": cfg, "model": model, "optimizer": optimizer, "checkpointed_at": None,
                                        "checkpoint_cost": None, "training_since": time.perf_counter(), **state})

    fixed = run_with(2)
    assert [loop.checkpoint_due(fixed, epoch) for epoch in range(4)] == [False, True, False, True]
    # None written yet: weights, moments and best weights (16 MB) guessed at 100 MB/s, ten times over.
    fresh = run_with("auto")
    assert loop.checkpoint_bytes(fresh) == pytest.approx(16e6, rel=0.01)
    fresh.training_since = time.perf_counter() - 1.0
    assert not loop.checkpoint_due(fresh, 0)
    fresh.training_since = time.perf_counter() - 2.0
    assert loop.checkpoint_due(fresh, 1)
    # After one: ten times what it cost since it was written.
    written = run_with("auto", checkpoint_cost=1.0)
    written.checkpointed_at = time.perf_counter() - 5.0
    assert not loop.checkpoint_due(written, 3)
    written.checkpoint_cost = 0.4
    assert loop.checkpoint_due(written, 3)
    with pytest.raises(config_lib.ConfigError, match=r"train.checkpoint_every=0 is out of range"):
        config_lib.build("mae", [{"train.checkpoint_every": 0}])
    with pytest.raises(config_lib.ConfigError, match=r"train.checkpoint_every=often is not allowed; expected auto or a number >= 1"):
        config_lib.build("mae", [{"train.checkpoint_every": "often"}])


@pytest.mark.slow
def test_a_trial_checkpoints_every_n_epochs_when_told(tmp_path):
    import glob

    import torch

    from tests.helpers import run_cli, tiny

    result = run_cli("platform.tune", "task=mae", "tune.name=spaced", "tune.num_samples=1", "tune.scheduler=none",
                     "train.epochs=4", "train.checkpoint_every=2", "train.checkpoints_to_keep=4",
                     *[f"{k}={v}" for k, v in MAE.items()], *tiny(tmp_path / "cache", tmp_path / "mlflow.db"),
                     cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    states = sorted(glob.glob(str(tmp_path / "ray_results" / "spaced" / "*" / "checkpoint_*" / loop.STATE_FILE)))
    assert [torch.load(path, weights_only=True)["epoch"] for path in states] == [2, 4], states
