"""The search beyond one objective over a flat space, through the CLI: a conditional space (pinn's
shipped one: no warm-up for a constant physics schedule) and a second sweep warm-started from the
first's best trials; two objectives with a constraint and their Pareto front; population based
training, its lineage in MLflow, on trials in their own process and on Train workers, and resumed."""

import json
import re
import signal
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from platform import insight, tracking
from tests.helpers import run_cli, run_cli_here, start_cli, tiny

pytestmark = pytest.mark.slow

TINY_PINN = ["model.backbone=resnet10t", "model.source_channels=4", "physics.source_pixels=16", "train.epochs=1",
             "tune.search=random", "tune.scheduler=none", "scaling.num_workers=0", "plots.gradcam=false",
             "plots.embeddings=false", "mlflow.register_model=false", "mlflow.system_metrics_s=0"]


def trials_of(client, sweep: str) -> list:
    experiment = client.get_experiment_by_name("deeplense-pinn").experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.`platform.sweep` = '{sweep}'",
                               order_by=["attributes.start_time ASC"])
    return [r for r in found if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.long
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


TINY_CLASSIFIER = ["train.epochs=2", "scaling.num_workers=0", "plots.gradcam=false", "plots.embeddings=false",
                   "mlflow.system_metrics_s=0"]
SIZES = """search:
  model.name:
    choice:
      resnet10t: {}
      resnet18: {model.drop_rate: {uniform: [0.0, 0.3]}}
  train.lr: {loguniform: [3.0e-4, 3.0e-3]}
"""


@pytest.mark.long
def test_two_objectives_with_a_constraint_keep_a_pareto_trial_within_it(tmp_path):
    db = tmp_path / "mlflow.db"
    (tmp_path / "sizes.yaml").write_text(SIZES)
    # resnet18 (11.2M parameters) breaks the constraint; resnet10t (4.9M) keeps to it.
    settings = [*TINY_CLASSIFIER, *tiny(tmp_path / "cache", db), f"tune.space={tmp_path / 'sizes.yaml'}",
                "tune.objectives=[val/auc_macro:max,model/params:min]", "tune.constraints=[model/params<=8e6]",
                "tune.search=nsga2", "tune.scheduler=none", "tune.pick=knee"]
    result = run_cli("platform.tune", "task=classification", "tune.name=sizes", "tune.num_samples=4", "tune.seed=1",
                     *settings, cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Pareto front (" in result.stdout and "kept by tune.pick=knee" in result.stdout
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-classification").experiment_id
    parent = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'sizes' and "
                                                            "tags.`platform.kind` = 'sweep'")[0]
    trials = [r for r in client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'sizes'")
              if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 4 and {t.data.params["model.name"] for t in trials} == {"resnet10t", "resnet18"}
    for trial in trials:  # every run logs what a model costs, whatever the sweep optimises
        assert trial.data.metrics["model/params"] == (4923595 if trial.data.params["model.name"] == "resnet10t"
                                                      else 11171779)
        assert trial.data.metrics["model/images_per_s"] > 0
    assert parent.data.tags["platform.objectives"] == "val/auc_macro:max,model/params:min"
    assert parent.data.tags["platform.constraints"] == "model/params<=8e+06"

    # The front, recomputed from each trial's values at its best epoch, as MLflow holds them.
    def at_best(run, metric):
        epoch = run.data.tags["platform.best_epoch"]
        return [m.value for m in client.get_metric_history(run.info.run_id, metric) if str(m.step) == epoch][-1]

    points = {t.info.run_id: (at_best(t, "val/auc_macro"), t.data.metrics["model/params"]) for t in trials}
    feasible = {run_id for run_id, (_, params) in points.items() if params <= 8e6}
    front = {a for a in feasible if not any(points[b][0] >= points[a][0] and points[b][1] <= points[a][1]
                                            and points[b] != points[a] for b in feasible)}
    assert {t.info.run_id for t in trials if t.data.tags.get("platform.pareto") == "true"} == front
    kept = parent.data.tags["platform.best_run_id"]
    assert kept in front and points[kept][1] <= 8e6
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | \
        {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"pareto.csv", "sweep/pareto.png"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path))
    rows = open(table).read().splitlines()
    assert rows[0] == "trial_id,run_id,val/auc_macro,model/params,feasible,stopped_early,pareto,kept"
    assert len(rows) == 5 and sum(r.endswith(",True") for r in rows[1:]) == 1  # one kept

    # Optuna was told both values of each trial, and its excess over the constraint.
    study = optuna.load_study(study_name="sizes", storage=f"sqlite:///{tmp_path / 'ray_results' / 'sizes' / 'optuna.db'}")
    assert [len(t.values) for t in study.trials] == [2] * 4
    assert all(("constraints:model/params<=8e+06" in t.system_attrs) for t in study.trials)

    # Nothing can meet it: the sweep keeps no model, and says why in one line.
    none = run_cli("platform.tune", "task=classification", "tune.name=too-tight", "tune.num_samples=2",
                   *settings[:-4], "tune.objectives=[val/auc_macro:max,model/params:min]",
                   "tune.constraints=[model/params<=1e3]", "train.epochs=1", cwd=str(tmp_path))
    assert none.returncode == 1, (none.stdout + none.stderr)[-4000:]
    assert "error: none of the 2 finished trials met tune.constraints=[model/params<=1e3]" in none.stderr


PBT_SPACE = """search:
  train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  augment.strength: {uniform: [0.0, 1.0]}
"""


def pbt_trials(client, sweep: str) -> dict:
    experiment = client.get_experiment_by_name("deeplense-classification").experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.`platform.sweep` = '{sweep}'")
    return {r.data.tags["platform.trial_id"]: r for r in found if "mlflow.parentRunId" in r.data.tags}


def assert_lineage(client, trials: dict) -> int:
    """Each exploit on record: whose weights, at which epoch, and the values that took effect then."""
    exploits = 0
    for trial_id, run in trials.items():
        lineage = json.loads(run.data.tags.get("platform.pbt.lineage", "[]"))
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "pbt/train.lr")}
        assert history[0] == float(run.data.params["train.lr"])  # the first value: the run's MLflow param
        for exploit in lineage:
            assert exploit["weights_of"] in trials and exploit["weights_of"] != trial_id
            assert history[exploit["epoch"]] == pytest.approx(exploit["values"]["train.lr"])
            assert 1e-4 <= exploit["values"]["train.lr"] <= 3e-3  # perturbed within the space
        if lineage:
            assert run.data.tags["platform.pbt.exploited_from"] == lineage[-1]["weights_of"]
            assert int(run.data.tags["platform.pbt.exploits"]) >= len(lineage)
        exploits += len(lineage)
    return exploits


@pytest.mark.heavy
@pytest.mark.long
def test_pbt_exploits_with_its_lineage_in_mlflow_and_resumes_after_sigterm(tmp_path):
    db = tmp_path / "mlflow.db"
    (tmp_path / "pbt.yaml").write_text(PBT_SPACE)
    args = ["platform.tune", "task=classification", "tune.name=population", "tune.num_samples=3",
            "tune.scheduler=pbt", "tune.perturbation_interval=1", "model.name=resnet10t", "train.epochs=6",
            f"tune.space={tmp_path / 'pbt.yaml'}", *TINY_CLASSIFIER[1:], *tiny(tmp_path / "cache", db)]
    client = MlflowClient(f"sqlite:///{db}")
    driver = start_cli(*args, cwd=str(tmp_path))
    try:
        deadline = time.time() + 400
        while time.time() < deadline:  # stopped once a trial has taken another's weights
            time.sleep(0.5)
            try:
                trials = pbt_trials(client, "population")
            except Exception:
                continue
            if any("platform.pbt.lineage" in t.data.tags for t in trials.values()):
                break
        else:
            pytest.fail("no trial exploited another")
        driver.send_signal(signal.SIGTERM)
        first, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, first[-4000:]
    again = run_cli(*args, cwd=str(tmp_path))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "resuming sweep population" in again.stdout and "3 trials (0 failed)" in again.stdout
    trials = pbt_trials(client, "population")
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials.values())
    assert assert_lineage(client, trials) >= 1
    assert all(t.data.metrics["epoch"] == 6 for t in trials.values())


@pytest.mark.heavy
@pytest.mark.long
def test_pbt_on_train_workers_takes_the_other_trials_checkpoint(tmp_path):
    db = tmp_path / "mlflow.db"
    (tmp_path / "pbt.yaml").write_text(PBT_SPACE)
    # Two trials side by side for six epochs: at some report one ranks below the other, which has
    # been checkpointed as the better one at an earlier report of its own.
    result = run_cli("platform.tune", "task=classification", "tune.name=workers", "tune.num_samples=2",
                     "tune.scheduler=pbt", "tune.perturbation_interval=1", "model.name=resnet10t",
                     "train.epochs=6", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "plots.gradcam=false",
                     "plots.embeddings=false", "mlflow.system_metrics_s=0", f"tune.space={tmp_path / 'pbt.yaml'}",
                     *tiny(tmp_path / "cache", db, "data.num_train=96"), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{db}")
    trials = pbt_trials(client, "workers")
    assert assert_lineage(client, trials) >= 1
    # The exploited trial went on from its donor's epoch, not its own: its log says so.
    taken = re.findall(r"pbt: trial \S+ \(epoch \d\) takes the weights of trial \S+ \(epoch (\d)\)", result.stdout)
    resumed = re.findall(r"resuming from epoch (\d)", result.stdout)
    assert taken and set(taken) <= set(resumed), result.stdout[-4000:]
