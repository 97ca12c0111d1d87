"""What Optuna is told about each trial of a sweep: the sampler learns from it."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from platform import space as space_lib
from platform.searcher import TruthfulOptunaSearch

SPACE = space_lib.SearchSpace(path="", fixed={}, params={"train.lr": space_lib.Param("loguniform", [1e-4, 1e-2])})


def told(stopped_as: str, epochs_run: int, error: bool = False, epochs: int = 4,
         by_scheduler: bool = False) -> optuna.trial.FrozenTrial:
    """One trial through the searcher as Tune drives it: suggest, a result per epoch, complete.
    ``by_scheduler``: the last result is the one a scheduler stopped the trial on, which Tune hands
    to the searcher only with the completion."""
    search = TruthfulOptunaSearch(space=space_lib.define_by_run(SPACE), metric="val/auc", mode="max",
                                  sampler=optuna.samplers.RandomSampler(seed=0), epochs=epochs, stopped_as=stopped_as)
    assert search.suggest("t1") is not None
    last = None
    for epoch in range(1, epochs_run + 1):
        last = {"val/auc": 0.5 + 0.1 * epoch, "epoch": epoch, "training_iteration": epoch}
        if not (by_scheduler and epoch == epochs_run):
            search.on_trial_result("t1", last)
    search.on_trial_complete("t1", result=last, error=error)
    (trial,) = search._ot_study.trials  # the (in-memory) study Ray's searcher created
    return trial


def test_a_trial_asha_stopped_is_pruned_with_its_epochs_values():
    trial = told("pruned", epochs_run=2)
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {1: pytest.approx(0.6), 2: pytest.approx(0.7)}


def test_a_trial_a_scheduler_stopped_keeps_the_value_it_was_stopped_on():
    # Tune hands the stopping result only to on_trial_complete: a trial stopped at its first
    # report had no value at all in Optuna, and TPE ranked it below every other pruned trial.
    first = told("pruned", epochs_run=1, by_scheduler=True)
    assert first.state == TrialState.PRUNED and first.intermediate_values == {1: pytest.approx(0.6)}
    later = told("pruned", epochs_run=3, by_scheduler=True)
    assert later.intermediate_values == {1: pytest.approx(0.6), 2: pytest.approx(0.7), 3: pytest.approx(0.8)}


def test_a_trial_that_ran_every_epoch_is_complete_with_its_last_value():
    trial = told("pruned", epochs_run=4)
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.9)


def test_a_failed_trial_is_failed_not_complete():
    assert told("pruned", epochs_run=2, error=True).state == TrialState.FAIL


def test_stopped_as_complete_is_rays_own_behaviour():
    trial = told("complete", epochs_run=2)
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.7)
