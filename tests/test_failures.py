"""Failed trials: a diverging loss and a stalled trial fail alone, with a reason, and the sweep goes on."""

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, tiny

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
