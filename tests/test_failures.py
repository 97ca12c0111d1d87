"""Failed trials: a diverging loss and a stalled trial fail alone, with a reason, and the sweep goes on;
a tracking server that goes away holds no training up, and loses no record unless away too long."""

import re
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port, run_cli, start_cli, start_mlflow_server, stop_server, tiny

pytestmark = pytest.mark.slow

FAST = ["model.name=resnet10t", "train.epochs=1"]


def sweep_runs(client, sweep):
    experiment = client.get_experiment_by_name("deeplense-classification").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`platform.sweep` = '{sweep}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, trials


def test_a_diverging_trial_fails_with_its_reason_and_the_sweep_goes_on(tmp_path):
    db = tmp_path / "mlflow.db"
    space = tmp_path / "space.yaml"
    # Random search seeded 0 draws the absurd learning rate first, then the sane one.
    space.write_text("search:\n  train.lr: {choice: [1.0e+12, 1.0e-3]}\n")
    result = run_cli("platform.tune", "task=classification", f"tune.space={space}", "tune.search=random",
                     "tune.num_samples=2", "tune.name=nan", "scaling.num_workers=0", *FAST, *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "2 trials (1 failed)" in result.stdout
    assert "failed: FloatingPointError: train/loss became nan in epoch 1" in result.stdout

    parents, trials = sweep_runs(MlflowClient(f"sqlite:///{db}"), "nan")
    assert [p.info.status for p in parents] == ["FINISHED"]
    by_lr = {float(t.data.params["train.lr"]): t for t in trials}
    assert set(by_lr) == {1e12, 1e-3}
    failed, good = by_lr[1e12], by_lr[1e-3]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["platform.failure"].startswith("FloatingPointError: train/loss became nan in epoch 1")
    assert good.info.status == "FINISHED" and parents[0].data.tags["platform.best_run_id"] == good.info.run_id


@pytest.mark.parametrize("workers", ["1", "0"])  # a Ray Train worker; the trial's own process
def test_a_trial_past_its_time_limit_is_stopped_and_failed(tmp_path, workers):
    # train.max_failures=-1 retries failures forever, but never a timeout (an in-process trial
    # once started again with a fresh deadline each time, for ever).
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.tune", "task=classification", "tune.num_samples=1", "tune.name=slow",
                     "tune.trial_timeout_s=2", f"scaling.num_workers={workers}", "train.max_failures=-1", *FAST,
                     *tiny(tmp_path / "cache", db), cwd=str(tmp_path), timeout=300)
    assert result.returncode == 1, (result.stdout + result.stderr)[-4000:]
    assert "failed: TimeoutError: the trial ran past tune.trial_timeout_s=2 and was stopped" in result.stdout
    assert "no trial of sweep slow finished" in result.stderr

    parents, (trial,) = sweep_runs(MlflowClient(f"sqlite:///{db}"), "slow")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert trial.info.status == "FAILED" and "tune.trial_timeout_s=2" in trial.data.tags["platform.failure"]


MAE = ["task=mae", "train.checkpoint_every=1", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_dim=32",
       "model.decoder_depth=1", "tune.scheduler=none", "tune.num_samples=1", "scaling.num_workers=0"]


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"never saw {what}")


def epochs_logged(url: str) -> dict[str, list[int]]:
    """{run id: the steps of its val/loss} over the trial runs the server holds."""
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("deeplense-mae")
    if experiment is None:
        return {}
    trials = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    return {t.info.run_id: sorted(m.step for m in client.get_metric_history(t.info.run_id, "val/loss")) for t in trials}


# A real `mlflow server` stopped under a training trial and started again on the same store and port.
@pytest.mark.heavy
@pytest.mark.long
def test_a_tracking_server_that_goes_away_loses_no_epoch_and_one_away_too_long_fails_the_trial(tmp_path):
    store, artifacts, port = tmp_path / "server.db", str(tmp_path / "artifacts"), free_port()
    server, url = start_mlflow_server(str(store), artifacts, port)
    epochs = 12
    args = [*MAE, f"train.epochs={epochs}", *tiny(tmp_path / "cache", tmp_path / "unused.db"), f"mlflow.tracking_uri={url}"]
    try:
        # Away for 30 s, after the trial's second epoch: training goes on, its records wait, and all
        # arrive once the server is back.
        driver = start_cli("platform.tune", *args, "tune.name=away", cwd=str(tmp_path))
        wait_for(lambda: any(len(steps) >= 2 for steps in epochs_logged(url).values()), "two epochs logged")
        stop_server(server)
        time.sleep(30)
        server, url = start_mlflow_server(str(store), artifacts, port)
        output, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, output[-4000:]
        away, back = output.index("the tracking server does not answer"), output.index("the tracking server is back")
        assert re.search(rf"\[mae\] epoch {epochs}/{epochs} ", output[away:back]), output[-4000:]  # trained meanwhile
        ((run_id, steps),) = epochs_logged(url).items()
        assert steps == list(range(1, epochs + 1))  # every epoch exactly once
        trial = MlflowClient(url).get_run(run_id)
        assert trial.info.status == "FINISHED" and "test/loss" in MlflowClient(url).get_run(
            trial.data.tags["mlflow.parentRunId"]).data.metrics

        # Away for longer than mlflow.outage_limit_s: the trial fails, saying why; back, the sweep resumes.
        limited = [*args, "tune.name=gone", "mlflow.outage_limit_s=3"]
        driver = start_cli("platform.tune", *limited, cwd=str(tmp_path))
        wait_for(lambda: any(len(steps) >= 1 for run, steps in epochs_logged(url).items() if run != run_id),
                 "the second sweep's first epoch")
        stop_server(server)
        time.sleep(8)  # past the limit, whichever write notices first
        server, url = start_mlflow_server(str(store), artifacts, port)
        output, _ = driver.communicate(timeout=300)
        assert driver.returncode == 1, output[-4000:]
        assert "TrackingServerAwayError: the tracking server" in output and "(mlflow.outage_limit_s=3)" in output
        again = run_cli("platform.tune", *limited, "tune.resume=force", cwd=str(tmp_path))
        assert again.returncode == 0 and "1 trials (0 failed)" in again.stdout, (again.stdout + again.stderr)[-4000:]
    finally:
        stop_server(server)


def test_a_run_leaves_no_outbox_behind_and_keeps_one_only_while_the_server_is_away(tmp_path, monkeypatch):
    import tempfile

    from matplotlib.figure import Figure

    from platform import tracking

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    def outboxes() -> list:
        return list((tmp_path / "tmp").glob("deeplense-outbox-*"))

    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = store.create_run(store.create_experiment("records")).info.run_id
    (tmp_path / "note.txt").write_text("kept")
    writes = tracking.PatientClient(store, limit_s=60)
    figure = Figure()
    figure.subplots().plot([0, 1])
    writes.log_figure(run, figure, "plots/line.png")  # drawn to a file of its own first
    writes.log_artifact(run, str(tmp_path / "note.txt"))
    # Delivered: nothing left in the temp folder, though this client is never closed (a trial Tune stops).
    assert outboxes() == []
    assert {a.path for a in store.list_artifacts(run)} == {"plots", "note.txt"}

    away = tracking.PatientClient(MlflowClient(f"http://127.0.0.1:{free_port()}"), limit_s=60)
    away.log_artifact("0" * 32, str(tmp_path / "note.txt"))  # nothing answers: kept, with a copy of its file
    kept, = outboxes()
    assert [p.name for p in kept.rglob("*.txt")] == ["note.txt"]
    away.close()
    assert outboxes() == []
