"""The search beyond flat spaces, through the CLI: a conditional space (pinn's shipped one: no warm-up
for a constant physics schedule) and a second sweep warm-started from the first's best trials."""

import json

import pytest
from mlflow.tracking import MlflowClient

from platform import insight, tracking
from tests.helpers import run_cli, run_cli_here, tiny

pytestmark = pytest.mark.slow

TINY_PINN = ["model.backbone=resnet10t", "model.source_channels=4", "physics.source_pixels=16", "train.epochs=1",
             "tune.search=random", "tune.scheduler=none", "scaling.num_workers=0", "plots.gradcam=false",
             "plots.embeddings=false", "mlflow.register_model=false", "mlflow.system_metrics_s=0"]


def trials_of(client, sweep: str) -> list:
    experiment = client.get_experiment_by_name("deeplense-pinn").experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.`platform.sweep` = '{sweep}'",
                               order_by=["attributes.start_time ASC"])
    return [r for r in found if "mlflow.parentRunId" in r.data.tags]


def test_a_conditional_space_then_a_warm_start_from_its_best_trials(tmp_path):
    db = tmp_path / "mlflow.db"
    settings = [*TINY_PINN, *tiny(tmp_path / "cache", db)]
    first = run_cli("platform.tune", "task=pinn", "tune.name=first", "tune.num_samples=4", "tune.seed=3", *settings,
                    cwd=str(tmp_path))
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{db}")
    trials = trials_of(client, "first")
    schedules = [t.data.params["physics.schedule"] for t in trials]
    assert len(trials) == 4 and "constant" in schedules and set(schedules) - {"constant"}, schedules
    for trial in trials:  # the warm-up is searched only for the schedules that have one
        searched = trial.data.tags[tracking.SEARCHED_TAG].split(",")
        assert ("physics.warmup_epochs" in searched) == (trial.data.params["physics.schedule"] != "constant")
        assert {"physics.schedule", "physics.lambda_max", "train.lr"} <= set(searched)
    # The parent's trials table leaves a key a trial did not sample empty, not its default.
    parent = client.search_runs([trials[0].info.experiment_id],
                                filter_string="tags.`platform.sweep` = 'first' and tags.`platform.kind` = 'sweep'")[0]
    rows = insight.trial_rows(client, parent, "auc_macro")
    assert all((r["physics.warmup_epochs"] is None) == (r["physics.schedule"] == "constant") for r in rows)

    # A second sweep starts from the first's two best configurations; its space no longer searches
    # the physics weight, which is dropped with a note.
    space = tmp_path / "narrower.yaml"
    space.write_text("search:\n"
                     "  physics.schedule: {choice: [constant, linear, cosine, step]}\n"
                     "  physics.warmup_epochs: {int: [0, 2], when: {physics.schedule: [linear, cosine, step]}}\n"
                     "  train.lr: {loguniform: [3.0e-4, 3.0e-3]}\n")
    second = run_cli("platform.tune", "task=pinn", "tune.name=second", "tune.num_samples=3", "tune.warm_start=first",
                     "tune.warm_start_top=2", "tune.max_concurrent=1", f"tune.space={space}", *settings,
                     cwd=str(tmp_path))
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "warm start from sweep first: its 2 best configurations first" in second.stdout
    assert "not searched here any more, dropped: physics.lambda_max" in second.stdout
    best_first = sorted(rows, key=lambda r: r["best/auc_macro"], reverse=True)[:2]
    started = trials_of(client, "second")
    assert len(started) == 3
    def values(params) -> tuple:  # what a trial sampled, as MLflow has it
        return tuple(str(params.get(k)) for k in ("physics.schedule", "train.lr", "physics.warmup_epochs"))

    # Tried first (one trial at a time here), as they were, best first.
    assert [values(t.data.params) for t in started[:2]] == \
        [values({**r, "physics.warmup_epochs": r["physics.warmup_epochs"] if r["physics.warmup_epochs"] is not None
                 else 1}) for r in best_first]  # a constant schedule's warm-up: pinn's default
    second_parent = client.get_run(started[0].data.tags["mlflow.parentRunId"])
    assert second_parent.data.tags["platform.warm_start"] == "first"
    assert json.loads(second_parent.data.tags[tracking.SPACE_TAG])["search"]["physics.warmup_epochs"][2] == \
        {"physics.schedule": ["linear", "cosine", "step"]}

    # No such sweep: one line, before any work.
    missing = run_cli_here("platform.tune", "task=pinn", "tune.name=third", "tune.warm_start=nothing", *settings,
                           cwd=str(tmp_path))
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip() == (f"error: tune.warm_start=nothing: no sweep of that name in experiment deeplense-pinn "
                                      f"of sqlite:///{db}; expected the tune.name of an earlier sweep of task pinn")
