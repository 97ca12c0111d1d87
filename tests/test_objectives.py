"""Several objectives: the Pareto front, the rules that pick from it, constraints, and what a trial
reports to the search (platform/objectives.py). The sweeps themselves: tests/test_search.py."""

import math

import pytest

from platform import objectives
from platform.config import ConfigError
from platform.objectives import Constraint, Objective

AUC, PARAMS = Objective("val/auc_macro", "max"), Objective("model/params", "min")


def test_objectives_and_constraints_parse_from_their_settings():
    assert objectives.parse_objective(" val/auc_macro : max ") == AUC
    assert objectives.parse_constraint("model/params<=5e6") == Constraint("model/params", "<=", 5e6)
    assert objectives.parse_constraint("model/images_per_s>=100").excess(250.0) == -150.0  # met: <= 0
    assert objectives.parse_constraint("model/params<=5e6").excess(6e6) == 1e6
    with pytest.raises(ConfigError, match="is not metric<=number"):
        objectives.parse_constraint("model/params<=inf")


def test_the_front_is_the_feasible_trials_nothing_beats_on_every_objective():
    values = [[0.90, 11e6], [0.85, 5e6], [0.80, 6e6], [0.95, 30e6], [0.70, 1e6], [math.nan, 1e6]]
    feasible = [True, True, True, False, True, True]  # the 30e6 model breaks a constraint; NaN never counts
    assert objectives.pareto_front(values, feasible, [AUC, PARAMS]) == [0, 1, 4]
    # On one objective the front is the best trial (ties all stay).
    assert objectives.pareto_front([[0.9], [0.9], [0.8]], [True] * 3, [AUC]) == [0, 1]


def test_pick_first_takes_the_best_on_the_first_objective_and_knee_the_balanced_one():
    values = [[0.90, 11e6], [0.85, 5e6], [0.70, 1e6]]
    front = [0, 1, 2]
    assert objectives.pick(values, front, [AUC, PARAMS], "first") == 0
    # Scaled over the front: (0, 1), (0.25, 0.4), (1, 0): the middle one is nearest the ideal (0, 0).
    assert objectives.pick(values, front, [AUC, PARAMS], "knee") == 1
    assert objectives.pick(values, front, [PARAMS, AUC], "first") == 2  # the first objective decides


def test_a_trial_reports_its_objectives_at_its_best_epoch_and_a_metric_the_task_lacks_is_named():
    best = {"val/auc_macro": 0.8, "val/accuracy": 0.7, "model/params": 5e6, "model/images_per_s": 900.0}
    assert objectives.at_best_epoch(["val/accuracy", "model/params"], best, "classification") == \
        {"at_best/val/accuracy": 0.7, "at_best/model/params": 5e6}
    with pytest.raises(ValueError, match=r"name val/recall, which task classification does not log; it logs "
                                         r"model/images_per_s, model/params, val/accuracy, val/auc_macro"):
        objectives.at_best_epoch(["val/recall"], best, "classification")


def test_a_metric_the_task_does_not_log_is_refused_before_any_work(tmp_path):
    # The names come from scoring a few val rows with the untrained model on the driver: no Ray, no run.
    from tests.helpers import run_cli_here, tiny

    db = tmp_path / "mlflow.db"
    refused = run_cli_here("platform.tune", "task=classification", "tune.objectives=[val/recall:max,model/params:min]",
                           *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == (
        "error: tune.objectives/tune.constraints name val/recall, which task classification does not log; expected one "
        "of model/images_per_s, model/params, val/accuracy, val/auc_macro, val/auc_no, val/auc_sphere, val/auc_vort, "
        "val/loss")
    assert not db.exists() and not (tmp_path / "ray_results").exists()  # nothing started, nothing written
    constraint = run_cli_here("platform.tune", "task=classification", "tune.constraints=[val/f1>=0.5]",
                              *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert constraint.returncode == 2 and "name val/f1, which task classification does not log" in constraint.stderr
