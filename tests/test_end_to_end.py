"""The user's commands, for real: local Ray, Ray Train, Ray Tune with Optuna, MLflow on sqlite."""

import os

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, run_cli_here, tiny

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


@pytest.mark.own_ray  # the laptop path: the command starts a local Ray of its own on loopback
@pytest.mark.heavy
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

    # The registered model serves: typed float32 input of any batch size, three class scores out.
    import mlflow.pyfunc
    import numpy as np

    from platform import tracking

    with tracking.using_uri(f"sqlite:///{db}"):  # leaves no MLFLOW_TRACKING_URI behind for later tests
        served = mlflow.pyfunc.load_model(f"models:/classification/{version.version}")
    assert [s.type for s in served.metadata.get_input_schema().inputs] == [np.dtype("float32")]
    scores = served.predict(np.zeros((5, 1, 64, 64), dtype=np.float32))
    assert np.asarray(scores).shape == (5, 3)


def test_train_in_its_own_process(tmp_path):
    """scaling.num_workers=0: Ray Train's local mode, the loop in the command's own process."""
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.train", "task=classification", "model.name=resnet10t", "train.epochs=2",
                     "scaling.num_workers=0", "mlflow.register_model=false", *tiny(tmp_path / "cache", db),
                     cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = runs_of(client, "deeplense-classification")
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "0"
    assert len(run.data.tags["platform.worker_pids"].split(",")) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/auc_macro")] == [1, 2]
    assert "checkpoints/best_model.pt" in artifact_paths(client, run.info.run_id)
    assert any(p.startswith("model") for p in artifact_paths(client, run.info.run_id)) or \
        client.search_logged_models([run.info.experiment_id])


@pytest.mark.heavy
def test_train_on_two_ddp_workers_is_one_run(tmp_path):
    db = tmp_path / "mlflow.db"
    # Half a CPU each, so Ray Data keeps a CPU for reading on this 2-core machine. The data
    # cache is a URI, as object storage would be (file:// here, s3:// on a cloud). In bf16, as
    # `precision=auto` is on GPUs that have it (autocast runs on CPU too).
    result = run_cli("platform.train", "task=mae", "train.epochs=2", "scaling.num_workers=2",
                     "scaling.cpus_per_worker=0.5", "train.precision=bf16", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                     *tiny(f"file://{tmp_path}/bucket", db), cwd=str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    # Each worker reads its own half of the 48 training images; the epoch covers all of them.
    assert "epoch 2/2" in out and "48 samples on 2 workers" in out

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = runs_of(client, "deeplense-mae")  # rank 0 logs; never one run per worker
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    assert len(run.data.tags["platform.worker_pids"].split(",")) == 2  # two Train workers, one process group
    assert run.data.params["train.precision"] == "bf16" and 0 < run.data.metrics["val/loss"] < 10
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert steps == [1, 2], steps
    manifests = list((tmp_path / "bucket" / "sim").glob("*/manifest.json"))
    assert len(manifests) == 3  # train, val and test, uploaded with their manifests last


def test_fp16_trains_through_the_grad_scaler(tmp_path):
    # fp16 goes through the GradScaler (unscale before clipping); bf16 is the two-worker run above.
    db, precision = tmp_path / "mlflow.db", "fp16"
    result = run_cli("platform.train", "task=mae", "train.epochs=1", f"train.precision={precision}", "scaling.num_workers=0",
                     "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                     *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (run,) = runs_of(MlflowClient(f"sqlite:///{db}"), "deeplense-mae")
    assert run.data.params["train.precision"] == precision
    assert 0 < run.data.metrics["train/loss"] < 10 and 0 < run.data.metrics["val/loss"] < 10


def test_channels_last_trains_a_convolutional_model(tmp_path):
    # The GPU default (train.memory_format=auto), asked for on the CPU: weights and images in
    # channels-last layout through training, validation, the views and the test split.
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.train", "task=classification", "model.name=resnet10t", "train.epochs=1",
                     "train.memory_format=channels_last", *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (run,) = runs_of(MlflowClient(f"sqlite:///{db}"), "deeplense-classification")
    assert run.data.params["train.memory_format"] == "channels_last"
    assert 0 <= run.data.metrics["val/auc_macro"] <= 1 and "test/auc_macro" in run.data.metrics


@pytest.mark.heavy
def test_a_run_that_fails_ends_failed(tmp_path):
    db = tmp_path / "mlflow.db"
    # An absurd learning rate without clipping: the loss overflows in the first epoch.
    result = run_cli("platform.train", "task=mae", "train.epochs=2", "train.lr=1e30", "train.grad_clip=0",
                     "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                     *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "train/loss became" in out and "lower train.lr or enable train.grad_clip" in out
    (run,) = runs_of(MlflowClient(f"sqlite:///{db}"), "deeplense-mae")
    assert run.info.status == "FAILED"


@pytest.mark.heavy
def test_tune_mae_sweep(tmp_path):
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.tune", "task=mae", "tune.num_samples=2", "train.epochs=2", "tune.name=sweep-a",
                     "scaling.num_workers=0",
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
    # Logged with an explicit float32 signature: MLflow does not replay the example as float64.
    assert "Failed to validate serving input example" not in result.stdout + result.stderr
    assert os.path.exists(tmp_path / "ray_results" / "sweep-a" / "optuna.db")

    # A finished sweep is never silently run again: the same name is refused, unless forced,
    # and then it goes on: its Optuna study (TPE sees the earlier trials, and the new trial is
    # not a replay of an earlier point) and its MLflow parent run.
    same = ["task=mae", "tune.num_samples=1", "train.epochs=2", "tune.name=sweep-a", "scaling.num_workers=0", "model.depth=1",
            "model.embed_dim=32", "model.num_heads=2", *tiny(tmp_path / "cache", db)]
    refused = run_cli_here("platform.tune", *same, cwd=str(tmp_path))
    assert refused.returncode == 2 and "tune.name=sweep-a has finished" in refused.stderr, refused.stderr
    again = run_cli("platform.tune", *same, "tune.resume=force", cwd=str(tmp_path))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "adding trials to sweep sweep-a" in again.stdout
    runs = runs_of(client, "deeplense-mae")
    assert [r.info.run_id for r in runs if r.data.tags.get("platform.kind") == "sweep"] == [parent.info.run_id]
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 3
    import optuna

    study = optuna.load_study(study_name="sweep-a",
                              storage=f"sqlite:///{tmp_path / 'ray_results' / 'sweep-a' / 'optuna.db'}")
    assert len(study.trials) == 3
    # Optuna hears what happened: a trial ASHA stopped is pruned (keeping its epochs' values), not complete.
    children = [r for r in runs_of(client, "deeplense-mae") if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stopped = [c for c in children if c.data.tags.get("platform.stopped_early") == "true"]
    states = [t.state.name for t in study.trials]
    assert states.count("PRUNED") == len(stopped) and states.count("COMPLETE") == 3 - len(stopped), states
    assert all(t.intermediate_values for t in study.trials)
    points = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(points)) == 3, points


def test_tune_trials_train_in_one_reused_process(tmp_path):
    """scaling.num_workers=0: each trial trains in Tune's trial process, and Tune keeps that
    process for the next trial (no new process importing torch each time). ASHA still stops
    trials, MLflow and Optuna hear of it, and Tune keeps each trial's checkpoints."""
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.tune", "task=classification", "model.name=resnet10t", "scaling.num_workers=0",
                     "tune.num_samples=4", "tune.max_concurrent=1", "train.epochs=3", "tune.name=inproc",
                     "train.checkpoint_every=1",  # auto would space a resnet10t's out past these short trials
                     *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 trials (0 failed)" in result.stdout

    client = MlflowClient(f"sqlite:///{db}")
    runs = runs_of(client, "deeplense-classification")
    (parent,) = [r for r in runs if r.data.tags.get("platform.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags["platform.worker_pids"] for c in children}) == 1  # one process for all four
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/auc_macro")]
        assert steps == list(range(1, len(steps) + 1)) and steps, steps
        assert "checkpoints/best_model.pt" in artifact_paths(client, child.info.run_id)
        trial_dir, = (tmp_path / "ray_results" / "inproc").glob(f"run_trial_{child.data.tags['platform.trial_id']}_*")
        assert list(trial_dir.glob("checkpoint_*/state.pt")), list(trial_dir.iterdir())
    assert parent.data.tags["platform.best_run_id"] in {c.info.run_id for c in children}

    import optuna

    study = optuna.load_study(study_name="inproc",
                              storage=f"sqlite:///{tmp_path / 'ray_results' / 'inproc' / 'optuna.db'}")
    stopped = [c for c in children if c.data.tags.get("platform.stopped_early") == "true"]
    assert [t.state.name for t in study.trials].count("PRUNED") == len(stopped)


# What the default sweep may print, line by line (platform/console.py); anything else is noise.
CONSOLE_KINDS = {
    "config": r"^(task: \w+|\w+:( .*)?|  +\S.*|search space .*:)$",  # the resolved config, the space
    "data": r"^simulating \w+ \(seed \d+\): .*img/s\]$",  # the simulator's progress, on a first run
    "capacity": r"^up to \d+ trials? at once \(.*\): .*$",
    "trial table": r"^(Trial status: .*|Current time: .*|Logical resource usage: .*|Current best trial: .*|[╭│├╰].*)$",
    "epoch": r"^(\x1b\[\d+m)?\((run_trial|RayTrainWorker) pid=\d+\)(\x1b\[0m)? \[mae\] epoch \d+/\d+ .* val/loss .*$",
    "summary": r"^(cost: .*|note: .*|\[mae\] test/loss = .*|\d+ trials \(\d+ failed\)\. Best trial .*|"
               r"MLflow parent run .*|MLflow UI: .*|Optuna study: optuna-dashboard sqlite:///.* --host 127\.0\.0\.1 .*)$",
}


@pytest.mark.own_ray  # the laptop path, as a user types it
@pytest.mark.heavy
@pytest.mark.long
def test_the_default_sweep_prints_only_what_a_user_reads(tmp_path):
    """`python -m platform.tune task=mae` with no flags but where to keep things: every printed line
    is the config, the capacity, Tune's trial table, a trial's epoch line or the summary. Ray's
    report and checkpoint lines, MLflow's and Optuna's are gone; -v brings Ray's back."""
    import re

    db = tmp_path / "mlflow.db"
    result = run_cli("platform.tune", "task=mae", f"data.cache_dir={tmp_path / 'cache'}",
                     f"mlflow.tracking_uri=sqlite:///{db}", cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    unknown = [line for line in lines if not any(re.match(kind, line) for kind in CONSOLE_KINDS.values())]
    assert not unknown, "\n".join(unknown[:20])
    kinds = {name for name, kind in CONSOLE_KINDS.items() for line in lines if re.match(kind, line)}
    assert kinds == set(CONSOLE_KINDS), kinds
    epochs = [line for line in lines if re.match(CONSOLE_KINDS["epoch"], line)]
    assert len(epochs) == len(set(epochs)) and len(epochs) >= 4, epochs  # each epoch of each trial once
    assert "Current best trial" in result.stdout and "val/loss" in result.stdout  # the table's task column

    verbose = run_cli("platform.tune", "task=mae", "-v", "tune.num_samples=1", "train.epochs=1", "tune.name=loud",
                      "scaling.num_workers=1", "train.checkpoint_every=1", *tiny(tmp_path / "cache", db),
                      cwd=str(tmp_path))
    assert verbose.returncode == 0, verbose.stdout[-3000:] + verbose.stderr[-3000:]
    shown = verbose.stdout + verbose.stderr
    assert "Reporting training result" in shown and "Checkpoint successfully created" in shown, shown[-3000:]
    assert "log:\n  level: debug" in shown
