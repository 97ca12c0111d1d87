"""What a command prints: the user's numbers, not the libraries' bookkeeping.

With ``log.level=info`` (the default) a command prints its resolved config, Tune's trial table with
the task's columns, one line per epoch of each run, and its summary. Hidden: Ray Train's per-report,
checkpoint and worker-group lines, Tune's per-trial boxes, the PreemptionWatcher line the C++ core
of a Train controller logs on every run, MLflow's database, registration and download-bar lines,
Optuna's study lines. Warnings and errors always show. ``log.level=debug`` (or ``-v``) shows it all.
Every process of a run applies it: the command's, each trial's and each Train worker's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re

DEBUG = "debug"
# Libraries' loggers whose INFO lines are bookkeeping: shown with log.level=debug.
BOOKKEEPING_LOGGERS = ("ray.tune", "ray.train", "ray.data", "mlflow", "optuna")
# Notices logged as warnings that say nothing about this run (a security default of Ray's).
NOTICE_LOGGERS = ("ray._private.authentication",)
# Lines Ray processes write outside Python's logging, dropped where the command prints its
# workers' output: Ray Train's PreemptionWatcher is an actor with restarts whose arguments sit in
# the object store, which Ray's core worker reports as an error, on every Train run, harmlessly.
HIDDEN_WORKER_LINES = r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'"

_level = {"value": "info"}


def quiet(level: str) -> None:
    """Apply ``log.level`` to this process (idempotent)."""
    _level["value"] = level
    if level == DEBUG:
        return
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # read at each download
    for name in BOOKKEEPING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Some of Ray Train's modules log under their file's path ("Reporting training result ...").
    for name in list(logging.Logger.manager.loggerDict):
        if re.search(r"[/\\]ray[/\\](train|tune|data)[/\\]", name):
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import optuna  # its own handler and level, set when it first logs

        optuna.logging.set_verbosity(optuna.logging.WARNING)


def is_quiet() -> bool:
    return _level["value"] != DEBUG


def drop_worker_lines() -> None:
    """The driver drops ``HIDDEN_WORKER_LINES`` from its workers' output (a user's $RAY_DEDUP_LOGS_SKIP_REGEX wins)."""
    from ray._private import ray_logging

    if not is_quiet() or "RAY_DEDUP_LOGS_SKIP_REGEX" in os.environ:
        return
    for deduplicator in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        deduplicator.skip_re = re.compile(HIDDEN_WORKER_LINES)


def tune_output() -> dict:
    """What a sweep's ``Tuner.fit`` runs with: quiet, Tune's older console flow at ``verbose=0``
    (silent; ``trial_table`` prints) in place of its newer one, whose silent reporter still prints a
    box and two lines at the start; with log.level=debug, Tune's default."""
    if not is_quiet():
        return {}
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # read by Tune at fit time, in this driver only
    return {"verbose": 0}


def train_log_level() -> str:
    """Ray Train's own console level (its controller and workers): its INFO lines are per report."""
    return "DEBUG" if not is_quiet() else "WARNING"


@contextlib.contextmanager
def hushed():
    """A library call's printed bookkeeping (MLflow's "Successfully registered model") kept off the
    console when quiet; what it raises still propagates."""
    if not is_quiet():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def trial_table(params: list[str], metric: str, mode: str):
    """A Tune callback that prints Tune's own trial table (its terminal reporter's, every 30 s and
    at the end) with the searched ``params`` and the task's metrics (the first four a trial reports:
    the loop puts its objective, its best so far, the training loss and another validation metric
    first), and a failed trial's error, without Tune's boxes for each trial's start, result and end.
    Tune runs with ``verbose=0`` and its older output (``tune_output``), which then prints nothing."""
    import time

    from ray import tune
    from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter

    class TrialTable(tune.Callback):
        # Tune's reporter inside a plain callback: as one of Tune's reporters it would be the one
        # Tune sets up with its start time, and Tune's own silent one would fail on a trial's error.
        def __init__(self):
            self.reporter = TuneTerminalReporter(AirVerbosity.DEFAULT, metric=metric, mode=mode)
            self.reporter._inferred_params = list(params)
            self.reporter.setup(start_time=time.time())

        def setup(self, **info):
            self.reporter.setup(start_time=time.time(), total_samples=info.get("total_num_samples"))

        def on_step_end(self, iteration, trials, **info):
            self.reporter.print_heartbeat(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.reporter.on_trial_error(iteration, trials, trial, **info)

        def on_experiment_end(self, trials, **info):
            self.reporter.print_heartbeat(trials, force=True)
            self.reporter._end_block()

        def __reduce__(self):  # Tune saves its callbacks with the sweep's state, for a resume
            return trial_table, (params, metric, mode)

    return TrialTable()
