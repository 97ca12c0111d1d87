"""A dead driver: `python -m platform.tune` killed mid-sweep by a signal (SIGTERM, as `ray job stop`
sends; SIGKILL, as an OOM kill or a crashed head does), then the same command again: finished
trials are not run again, the unfinished one goes on from its checkpoint, the Optuna study and the
MLflow parent run are the same ones, and nothing is duplicated."""

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
    # A checkpoint every epoch (not train.checkpoint_every=auto's spacing), so that each kill finds one.
    return ["task=mae", "tune.name=resumable", f"tune.num_samples={trials}", "tune.max_concurrent=1", "tune.scheduler=none",
            "train.checkpoint_every=1",
            f"train.epochs={epochs}", *MAE, *tiny(tmp_path / "cache", tmp_path / "mlflow.db"), *extra]


def runs(client):
    experiment = client.get_experiment_by_name("deeplense-mae").experiment_id
    found = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'resumable'")
    return ([r for r in found if "mlflow.parentRunId" not in r.data.tags],
            {r.data.tags["platform.trial_id"]: r for r in found if "mlflow.parentRunId" in r.data.tags})


# SIGTERM, as `ray job stop` or a node shutting down sends: the driver saves the sweep's state and
# ends KILLED. Trials in their own process: 20 epochs of half a second each leave room to catch the
# second trial after its second epoch, its first checkpoint on disk however busy the machine; the
# first trial, finished, must not run again.
@pytest.mark.heavy
@pytest.mark.long
def test_a_sweep_stopped_by_sigterm_resumes_with_the_same_command(tmp_path):
    workers, trials, epochs, caught_after = "0", 2, 20, 2

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


def kill_when(driver, client, ready, what: str, timeout: float = 300, first=None) -> None:
    """SIGKILL ``driver`` as soon as ``ready(parents, runs_of_trials)`` holds in MLflow (after ``first()``)."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
        try:
            found = runs(client)
        except Exception:  # no experiment yet, or the store mid-write
            continue
        if ready(*found):
            if first:
                first()
            driver.kill()
            driver.communicate(timeout=60)
            return
    output = driver.communicate(timeout=60)[0] if driver.poll() is not None else ""
    driver.kill()
    pytest.fail(f"the sweep never reached the moment to kill it ({what}): {output[-3000:]}")


def finished(runs_of_trials) -> dict:
    return {tid: t.info.end_time for tid, t in runs_of_trials.items() if t.info.status == "FINISHED"}


def assert_one_whole_sweep(client, tmp_path, trials: int, epochs: int, kills: int) -> None:
    """The sweep as if never killed: one parent run, ``trials`` finished trial runs with every epoch
    logged once, the runs the dead drivers left settled as KILLED, one study, one registered model."""
    (parent,), runs_of_trials = runs(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["platform.resumed"] == str(kills)
    assert "test/loss" in parent.data.metrics and parent.data.tags["platform.registered_version"] == "1"
    statuses = sorted(t.info.status for t in runs_of_trials.values())
    assert statuses.count("FINISHED") == trials and set(statuses) <= {"FINISHED", "KILLED"}, statuses
    for trial_id, trial in runs_of_trials.items():
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/loss")]
        if trial.info.status == "FINISHED":  # every epoch logged exactly once
            assert sorted(steps) == list(range(1, epochs + 1)), (trial_id, steps)
    (version,) = client.search_model_versions("name='mae'")
    study = optuna.load_study(study_name="resumable",
                              storage=f"sqlite:///{tmp_path / 'ray_results' / 'resumable' / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == trials, states
    assert set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}, states


# SIGKILL at four moments of one sweep: before its first trial, between two trials, part-way through
# a trial, and while its best model is kept; each time the same command again. On a laptop: each
# command starts its own local Ray, which dies with its driver, so each rerun also finds the Ray
# cluster gone.
@pytest.mark.heavy
@pytest.mark.own_ray
@pytest.mark.long
def test_a_sweep_killed_outright_at_each_moment_continues_each_time(tmp_path):
    trials, epochs = 3, 3
    args = sweep(tmp_path, trials, epochs, "scaling.num_workers=0")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def started(run) -> bool:
        return run.info.status == "RUNNING" and run.data.metrics.get("epoch", 0) >= 1

    moments = [
        ("before the first trial", lambda parents, trials_: bool(parents) and not trials_),
        ("between two trials", lambda parents, trials_: len(finished(trials_)) == 1
            and not any(started(t) for t in trials_.values())),
        ("part-way through a trial", lambda parents, trials_: len(finished(trials_)) >= 1
            and any(started(t) for t in trials_.values())),
        ("while its best model is kept", lambda parents, trials_: len(finished(trials_)) == trials
            and parents[0].info.status == "RUNNING"),
    ]

    def a_second_driver_is_refused():
        second = run_cli_here("platform.tune", *args, cwd=str(tmp_path))
        assert second.returncode == 2 and "tune.name=resumable is running already (platform.tune pid" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr

    done = {}
    for what, ready in moments:
        kill_when(start_cli("platform.tune", *args, cwd=str(tmp_path)), client, ready, what,
                  first=a_second_driver_is_refused if what == "part-way through a trial" else None)
        # A trial finished before a kill is never run again: its run ended once, when it finished.
        assert all(finished(runs(client)[1]).get(tid) == end for tid, end in done.items()), what
        done = finished(runs(client)[1])
    again = run_cli("platform.tune", *args, cwd=str(tmp_path))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming sweep resumable" in again.stdout and f"[mae] epoch 1/{epochs} " not in again.stdout
    now = finished(runs(client)[1])
    assert all(now.get(tid) == end for tid, end in done.items()), (done, now, again.stdout[-3000:])
    assert_one_whole_sweep(client, tmp_path, trials, epochs, kills=len(moments))


def registered_checkpoint(tmp_path, trial_id: str) -> int:
    """The epoch of the latest checkpoint Ray Train registered for the trial's run (0: none yet)."""
    import json

    snapshot = tmp_path / "ray_results" / f"resumable-{trial_id}" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return 0
    return int(latest["checkpoint_dir_name"].split("-")[1]) if latest else 0


# Trials on Ray Train workers: SIGKILL part-way through a trial, once Ray Train has registered one of
# its checkpoints (its controller does so at its next poll, every 2 s); the trial's worker group
# resumes from it, or from a later one the dying run registered.
@pytest.mark.heavy
@pytest.mark.long
def test_a_sweep_on_train_workers_killed_outright_continues_from_its_checkpoint(tmp_path):
    trials, epochs = 1, 10
    args = sweep(tmp_path, trials, epochs, "scaling.num_workers=1")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    kill_when(start_cli("platform.tune", *args, cwd=str(tmp_path)), client,
              lambda parents, trials_: any(t.info.status == "RUNNING" and registered_checkpoint(tmp_path, tid) >= 1
                                           for tid, t in trials_.items()), "part-way through the trial")
    (trial_id,) = runs(client)[1]
    again = run_cli("platform.tune", *args, cwd=str(tmp_path))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    resumed_from = [int(e) for e in re.findall(r"resuming from epoch (\d+)", again.stdout)]
    assert len(resumed_from) == 1 and 1 <= resumed_from[0] < epochs, again.stdout[-4000:]
    # Only the epochs after its checkpoint trained again.
    assert len(re.findall(rf"\[mae\] epoch \d+/{epochs} ", again.stdout)) == epochs - resumed_from[0]
    assert runs(client)[1].keys() == {trial_id}
    assert_one_whole_sweep(client, tmp_path, trials, epochs, kills=1)
