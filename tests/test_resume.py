"""A dead driver: `python -m platform.tune` killed mid-sweep by a signal, then the same command
again: finished trials are not run again, the unfinished one goes on from its checkpoint, the
Optuna study and the MLflow parent run are the same ones, and nothing is duplicated."""

import re
import signal
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, run_cli_here, start_cli, tiny

pytestmark = pytest.mark.slow

MAE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1"]


def sweep(tmp_path, trials, epochs, *extra):
    return ["task=mae", "tune.name=resumable", f"tune.num_samples={trials}", "tune.max_concurrent=1", "tune.scheduler=none",
            f"train.epochs={epochs}", *MAE, *tiny(tmp_path / "cache", tmp_path / "mlflow.db"), *extra]


def runs(client):
    experiment = client.get_experiment_by_name("deeplense-mae").experiment_id
    found = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'resumable'")
    return ([r for r in found if "mlflow.parentRunId" not in r.data.tags],
            {r.data.tags["platform.trial_id"]: r for r in found if "mlflow.parentRunId" in r.data.tags})


# Trials on a Ray Train worker, and in the trial's own process: there, with no process to start,
# a 3-epoch trial of 48 images is over in 2 s, before the sweep could be caught part-way; 20 epochs
# of half a second each leave room to catch it after its second epoch, its first checkpoint on disk
# however busy the machine. The in-process sweep has a finished trial that must not run again (Tune's
# doing, whatever runs the trials); the Train-worker sweep is one trial, whose worker group resumes
# from the checkpoint its rank 0 wrote (each Train trial costs half a minute of start-up on CI).
@pytest.mark.heavy
@pytest.mark.parametrize("workers, trials, epochs, caught_after", [("1", 1, 3, 1), ("0", 2, 20, 2)])
def test_a_killed_sweep_resumes_with_the_same_command(tmp_path, workers, trials, epochs, caught_after):
    def args(*extra):
        return sweep(tmp_path, trials, epochs, f"scaling.num_workers={workers}", *extra)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    driver = start_cli("platform.tune", *args(), cwd=str(tmp_path))
    try:
        deadline = time.time() + 400
        while time.time() < deadline:  # the trials before the last finished, the last one part-way
            time.sleep(0.5)
            try:
                _, runs_of_trials = runs(client)
            except Exception:
                continue
            finished = [t for t in runs_of_trials.values() if t.info.status == "FINISHED"]
            going = [t for t in runs_of_trials.values()
                     if t.info.status == "RUNNING" and t.data.metrics.get("epoch", 0) >= caught_after]
            if len(finished) == trials - 1 and going:
                time.sleep(1)  # its first checkpoint on disk
                break
        else:
            pytest.fail(f"the sweep never got {trials - 1} trials done and the next one part-way")
        driver.send_signal(signal.SIGTERM)  # as `ray job stop` or a shutting-down node would
        first_output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, first_output[-4000:]
    assert "run the same command again to resume it" in first_output

    (parent,), runs_of_trials = runs(client)
    assert parent.info.status == "KILLED"
    assert sorted(t.info.status for t in runs_of_trials.values()) == ["FINISHED"] * (trials - 1) + ["KILLED"]
    done_before = {tid for tid, t in runs_of_trials.items() if t.info.status == "FINISHED"}
    killed_at = {tid: int(t.data.metrics["epoch"]) for tid, t in runs_of_trials.items() if t.info.status == "KILLED"}

    again = run_cli("platform.tune", *args(), cwd=str(tmp_path))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming sweep resumable" in again.stdout and f"{trials} trials (0 failed)" in again.stdout

    (same_parent,), runs_of_trials = runs(client)
    assert same_parent.info.run_id == parent.info.run_id and same_parent.info.status == "FINISHED"
    assert same_parent.data.tags["platform.resumed"] == "1"
    assert len(runs_of_trials) == trials and all(t.info.status == "FINISHED" for t in runs_of_trials.values())
    for trial_id, trial in runs_of_trials.items():  # every epoch of every trial logged exactly once
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/loss")]
        assert sorted(steps) == list(range(1, epochs + 1)), (trial_id, steps)
    (unfinished,) = killed_at
    # From a checkpoint, not from scratch, and never past what it logged. Not always the last
    # logged epoch: rank 0 logs each epoch to MLflow at once, while Ray Train's controller
    # registers the epoch's checkpoint at its next poll; fast epochs can outrun it.
    resumed_from = [int(e) for e in re.findall(r"resuming from epoch (\d+)", again.stdout)]
    assert len(resumed_from) == 1 and 1 <= resumed_from[0] <= killed_at[unfinished], (killed_at, again.stdout[-4000:])
    # The finished trial did not run again: the second run trained only the rest of the other.
    trained = len(re.findall(rf"\[mae\] epoch \d+/{epochs} ", again.stdout))
    assert trained == epochs - resumed_from[0], again.stdout[-4000:]
    assert done_before <= set(runs_of_trials)

    study = optuna.load_study(study_name="resumable",
                              storage=f"sqlite:///{tmp_path / 'ray_results' / 'resumable' / 'optuna.db'}")
    assert len(study.trials) == trials and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    # What a new command with that name may and may not do, each refused in one line before any work.
    finished = run_cli_here("platform.tune", *args(), cwd=str(tmp_path))
    assert finished.returncode == 2 and "tune.name=resumable has finished" in finished.stderr
    never = run_cli_here("platform.tune", *args("tune.resume=never"), cwd=str(tmp_path))
    assert never.returncode == 2 and "tune.name=resumable exists already" in never.stderr
    (tmp_path / "other.yaml").write_text("search:\n  model.mask_ratio: {uniform: [0.1, 0.2]}\n")
    changed = run_cli_here("platform.tune", *args("tune.resume=force", f"tune.space={tmp_path / 'other.yaml'}"),
                           cwd=str(tmp_path))
    assert changed.returncode == 2 and "was started with another search space (model.decoder_depth" in changed.stderr
    longer = run_cli_here("platform.tune", *args("tune.resume=force", f"train.epochs={epochs + 2}"), cwd=str(tmp_path))
    assert longer.returncode == 2, longer.stderr
    assert f"was started with train.epochs={epochs}; this command has train.epochs={epochs + 2}" in longer.stderr
    missing = run_cli_here("platform.tune", *args("tune.resume=force", "tune.name=nothing-here"),
                           cwd=str(tmp_path))
    assert missing.returncode == 2 and "there is no sweep named nothing-here to resume" in missing.stderr
    for result in (finished, never, changed, longer, missing):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
