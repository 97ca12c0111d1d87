"""Domain adaptation (adapt.method=dann|coral): trained on simulated images while seeing a folder of
unlabelled target images, through the real CLIs, read back from MLflow."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from platform import adapt, config, registry
from platform.data.lenses import simulate_lenses
from tests.helpers import run_cli, run_cli_here, tiny

ROOT = Path(__file__).resolve().parents[1]
LENS_TINY = ["task=lens_finding", "data.preset=ideal", "sim.val_positive_fraction=0.2", "model.name=resnet10t"]


def target_folder(root, n=24, shape=None, preset="hsc"):
    """Unlabelled target images, nested a level deep as a survey's export might be: real-like cutouts
    of the calibrated preset, while training sees the uncalibrated one."""
    images, _ = simulate_lenses(n, 0.3, seed=7, preset=preset)
    for i, image in enumerate(images):
        folder = root / f"tract{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"cutout_{i:03d}.npy", image if shape is None else np.zeros(shape, np.float32) + i)
    return root


def test_the_adaptation_losses():
    torch.manual_seed(0)
    same = torch.randn(64, 8)
    assert adapt.coral(same, same).item() == pytest.approx(0.0, abs=1e-9)
    assert adapt.coral(same, 3 * torch.randn(64, 8)).item() > 0.1  # covariances apart
    x = torch.randn(4, 3, requires_grad=True)
    adapt.GradientReversal.apply(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), -0.5))  # the gradient reversed and scaled
    assert adapt.ramp(0.0) == 0.0 and adapt.ramp(0.5) == pytest.approx(0.9866, abs=1e-4) and adapt.ramp(1.0) > 0.999


@pytest.mark.parametrize("task, extra", [
    ("classification", {"model.name": "resnet10t"}),
    ("lens_finding", {"model.name": "resnet10t"}),
    ("multitask", {"model.encoder": "resnet10t"}),
    ("pinn", {"model.backbone": "resnet10t", "physics.pixel_scale": 0.1}),
    ("mae_finetune", {"model.depth": 1, "model.embed_dim": 32, "model.num_heads": 2}),
])
def test_each_classifier_task_hands_its_class_heads_features_to_the_adapter(task, extra):
    """The features a DANN or CORAL loss aligns are the class head's input, caught in the task's own
    train_step, with a gradient back into the model."""
    cfg = config.build(task, [{**extra, "adapt.method": "coral", "adapt.path": "/unused"}])
    t = registry.task_of(cfg)
    model = t.build_model(cfg)
    channels = 3 if task == "lens_finding" else 1
    size = 64
    images = torch.rand(4, channels, size, size)
    adapter = adapt.build(t, cfg, model, images[:2], lambda m, ddp: m)
    model.train()
    model(images)
    loss = adapter.loss(model, torch.rand(4, channels, size, size), progress=0.5)
    loss.backward()
    assert loss.item() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert adapter.caught == []  # nothing kept between steps


def test_adaptation_is_refused_in_one_line_before_any_work(tmp_path):
    target = target_folder(tmp_path / "target", n=4)
    odd = target_folder(tmp_path / "odd", n=2, shape=(1, 64, 64))  # one band where training has three
    cases = [
        (["task=lens_finding", "sim.val_positive_fraction=0.2", "adapt.method=dann"], "adapt.method=dann needs adapt.path=FOLDER"),
        (["task=lens_finding", "sim.val_positive_fraction=0.2", "adapt.method=coral", f"adapt.path={tmp_path}/nowhere"],
         f"adapt.path={tmp_path}/nowhere does not exist or is not a folder"),
        (["task=lens_finding", "sim.val_positive_fraction=0.2", "adapt.method=dann", f"adapt.path={odd}"], "(3, H, W)"),
        (["task=mae", "adapt.method=dann", f"adapt.path={target}"],
         "task mae has no class head to adapt; domain adaptation is for the classifiers: classification, "
         "lens_finding, mae_finetune, multitask, pinn"),
        (["task=mae_finetune", "head=superres", "adapt.method=coral", f"adapt.path={target}"],
         "task mae_finetune head=superres has no class head"),
        (["task=lens_finding", "adapt.method=mmd"], "adapt.method"),
        (["task=lens_finding", "adapt.weight=-1"], "adapt.weight"),
    ]
    for args, message in cases:
        # A Ray temp folder of its own: a local Ray someone else runs is not this command's to probe.
        result = run_cli_here("platform.train", *args,
                              *tiny(tmp_path / "cache", tmp_path / "m.db"), cwd=str(tmp_path),
                              env={"RAY_TMPDIR": str(tmp_path / "ray")})
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "m.db").exists()  # no run was opened


@pytest.mark.slow
def test_dann_on_two_ddp_workers_records_its_target_data_and_loss(tmp_path):
    db, target = tmp_path / "mlflow.db", target_folder(tmp_path / "real")
    result = run_cli("platform.train", *LENS_TINY, "train.epochs=2", "scaling.num_workers=2",
                     "scaling.cpus_per_worker=0.5", f"adapt.path={target}", "adapt.method=dann", "adapt.weight=0.5",
                     *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "samples on 2 workers" in out
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-lens_finding").experiment_id])
    assert run.data.params["adapt.method"] == "dann" and run.data.params["adapt.weight"] == "0.5"
    # The domain head's loss each epoch: a binary cross-entropy, near log 2 when it cannot tell.
    history = client.get_metric_history(run.info.run_id, "train/adapt_loss")
    assert [m.step for m in history] == [1, 2] and all(0 < m.value < 2 for m in history)
    # The target images are the run's "adapt" dataset, every file listed, no label column.
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test", "adapt"}
    assert "label" not in inputs["adapt"].schema and inputs["adapt"].name.startswith("adapt-real-")
    listed = client.download_artifacts(run.info.run_id, "data/adapt_files.txt", str(tmp_path))
    assert sorted(open(listed).read().split()) == sorted(str(p.relative_to(target)) for p in target.rglob("*.npy"))


@pytest.mark.slow
def test_a_sweep_searches_the_method_and_its_weight_in_process(tmp_path):
    """The shipped sim-to-real space: adapt.method searched with the source-only baseline, adapt.weight
    sampled only for a method that has one, each trial in its own process."""
    db, target = tmp_path / "mlflow.db", target_folder(tmp_path / "real")
    result = run_cli("platform.tune", *LENS_TINY, f"tune.space={ROOT}/search_spaces/lens_finding_adapt.yaml",
                     "tune.num_samples=3", "tune.scheduler=none", "train.epochs=1", "scaling.num_workers=0",
                     f"adapt.path={target}", "tune.seed=3", *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("deeplense-lens_finding").experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 3
    for trial in trials:
        method = trial.data.params["adapt.method"]
        assert method in ("none", "dann", "coral")
        assert ("train/adapt_loss" in trial.data.metrics) == (method != "none")
        datasets = {d.tags[0].value for d in trial.inputs.dataset_inputs}
        assert ("adapt" in datasets) == (method != "none")


def test_a_frozen_encoder_stays_frozen_for_the_target_batch_too():
    """mae_finetune's first epochs keep its encoder frozen: the adaptation loss must not reach it
    through the target images either."""
    cfg = config.build("mae_finetune", [{"model.depth": 1, "model.embed_dim": 32, "model.num_heads": 2,
                                         "adapt.method": "coral", "adapt.path": "/unused"}])
    task = registry.task_of(cfg)
    model = task.build_model(cfg)
    adapter = adapt.build(task, cfg, model, torch.rand(2, 1, 64, 64), lambda m, ddp: m)
    model.train()
    loss = task.train_step(model, {"image": torch.rand(4, 1, 64, 64), "label": torch.tensor([0, 1, 2, 0]),
                                   "epoch": 0}, cfg)["loss"]
    (loss + adapter.loss(model, 5 * torch.rand(4, 1, 64, 64), progress=0.5)).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert any(p.grad is not None for p in model.head.parameters())
