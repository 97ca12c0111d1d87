"""Optuna behind Ray Tune, told what really happened to each trial.

Ray's ``OptunaSearch`` tells Optuna that a trial ASHA stopped early is COMPLETE, with the
value of the last epoch it reached: a trial stopped after one epoch looks to TPE like a
finished one that ended poorly, or (on a metric that is still rising) like a finished one
that ended well. Here it is PRUNED: Optuna keeps the per-epoch values it was sent
(``trial.report``), and TPE ranks pruned trials after the completed ones, a trial pruned
later above one pruned earlier. A trial that failed is FAIL, not COMPLETE with the value it
had before failing.

The study outlives the driver (a file beside the sweep's state): a driver killed after telling
Optuna a trial's end, but before Tune saved its own state, comes back with that trial unfinished;
the trial's rerun is not told again (Optuna refuses to update a finished trial).
"""

from __future__ import annotations

import logging
import math
import threading

from optuna.samplers import NSGAIISampler
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from platform.objectives import AT_BEST

logger = logging.getLogger(__name__)


class TruthfulOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells stopped trials as PRUNED (``stopped_as="pruned"``) and failed ones as FAIL.

    ``epochs``: what a trial that runs to its end reports as its last ``epoch``; one that
    reports fewer was stopped. ``stopped_as="complete"`` is Ray's own behaviour. ``constraints``
    (``objectives.Constraint``): each trial's excess over them is set on its Optuna trial before it
    is told (``Trial.set_constraint``), where Optuna's samplers read it.
    """

    def __init__(self, *args, epochs: int, stopped_as: str = "pruned", constraints=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs, self.stopped_as, self.constraints = epochs, stopped_as, list(constraints)
        self._reported_steps: dict[str, set[int]] = {}  # per trial, the steps Optuna was sent

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._told_already(trial_id):
            return
        super().on_trial_result(trial_id, result)
        if trial_id not in self._completed_trials:
            self._reported_steps.setdefault(trial_id, set()).add(result[TRAINING_ITERATION])

    def _told_already(self, trial_id: str) -> bool:
        """Whether the study holds this trial's end already (told by an earlier driver of the sweep)."""
        trial = self._ot_trials.get(trial_id)
        if trial_id in self._completed_trials or trial is None:
            return False  # Ray's own warning, or its KeyError, as before
        if not self._ot_study._storage.get_trial(trial._trial_id).state.is_finished():
            return False
        self._completed_trials.add(trial_id)
        return True

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._told_already(trial_id):
            return
        self._set_constraints(trial_id, result)
        stopped = not error and bool(result) and result.get("epoch", self.epochs) < self.epochs
        if self.stopped_as == "complete" or trial_id in self._completed_trials or not (error or stopped):
            return super().on_trial_complete(trial_id, result, error)
        try:
            trial = self._ot_trials[trial_id]
            # (A multi-objective study takes no per-epoch values: Optuna cannot prune on several.)
            if stopped and not isinstance(self.metric, list) and self.metric in result:
                # The result a scheduler stops a trial on reaches the searcher here, never through
                # on_trial_result: without it a trial stopped at its first report is pruned with no
                # value at all, and TPE ranks it below every other pruned trial.
                step = result[TRAINING_ITERATION]
                if step not in self._reported_steps.get(trial_id, ()):
                    trial.report(result[self.metric], step)
            self._ot_study.tell(trial, state=TrialState.FAIL if error else TrialState.PRUNED)
        except Exception as exc:  # as Ray does: a bad tell must not end the sweep
            logger.warning(exc)
        self._completed_trials.add(trial_id)

    def _set_constraints(self, trial_id: str, result: dict | None) -> None:
        trial = self._ot_trials.get(trial_id)
        if not self.constraints or not result or trial is None or trial_id in self._completed_trials:
            return
        values = [result.get(AT_BEST + c.metric, math.nan) for c in self.constraints]
        if all(math.isfinite(v) for v in values):
            for constraint, value in zip(self.constraints, values):
                trial.set_constraint(str(constraint), constraint.excess(value))


class SavedNSGAIISampler(NSGAIISampler):
    """Optuna's NSGA-II, which Tune can save with the sweep's state: its lock is made anew when loaded."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
