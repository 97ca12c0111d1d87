"""What Optuna is told about each trial of a sweep: the sampler learns from it."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from platform import space as space_lib
from platform.searcher import TruthfulOptunaSearch

SPACE = space_lib.SearchSpace(path="", fixed={}, params={"train.lr": ("loguniform", [1e-4, 1e-2])})


def told(stopped_as: str, epochs_run: int, error: bool = False, epochs: int = 4) -> optuna.trial.FrozenTrial:
    """One trial through the searcher as Tune drives it: suggest, a result per epoch, complete."""
    search = TruthfulOptunaSearch(space=space_lib.define_by_run(SPACE), metric="val/auc", mode="max",
                                  sampler=optuna.samplers.RandomSampler(seed=0), epochs=epochs, stopped_as=stopped_as)
    assert search.suggest("t1") is not None
    last = None
    for epoch in range(1, epochs_run + 1):
        last = {"val/auc": 0.5 + 0.1 * epoch, "epoch": epoch, "training_iteration": epoch}
        search.on_trial_result("t1", last)
    search.on_trial_complete("t1", result=last, error=error)
    (trial,) = search._ot_study.trials  # the (in-memory) study Ray's searcher created
    return trial


def test_a_trial_asha_stopped_is_pruned_with_its_epochs_values():
    trial = told("pruned", epochs_run=2)
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {1: pytest.approx(0.6), 2: pytest.approx(0.7)}


def test_a_trial_that_ran_every_epoch_is_complete_with_its_last_value():
    trial = told("pruned", epochs_run=4)
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.9)


def test_a_failed_trial_is_failed_not_complete():
    assert told("pruned", epochs_run=2, error=True).state == TrialState.FAIL


def test_stopped_as_complete_is_rays_own_behaviour():
    trial = told("complete", epochs_run=2)
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.7)
