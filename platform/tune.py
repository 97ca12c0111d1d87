"""``python -m platform.tune task=mae``: a hyperparameter sweep, one MLflow parent run.

Each Tune trial is a small function that builds and fits one Ray Train ``TorchTrainer``
(Train V2: ``Tuner(TorchTrainer)`` is gone) and reports its epochs back to Tune itself, as the
run's controller hands them over (``epoch_reports``). Optuna's TPE proposes the values, ASHA
stops the poor trials.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import tempfile

from platform import (PROJECT_ROOT, adapt, cli, cluster, console, cost, insight, objectives, pretrained, provenance, registry,
                      runs, space as space_lib, tracking)
from platform import config as config_lib
from platform.runner import (built_data, default_name, log_best_model, log_data, log_datasets, loop_config,
                             make_trainer, metrics_logged, open_run, put_in_memory, reads_with_ray_data, settled,
                             storage_path, streamed)

FAILURE_TAG = tracking.FAILURE_TAG


def run_trial(sampled: dict, *, base: dict, shards: dict, in_memory: dict, uri: str, experiment: str, parent: str,
              sweep: str, init_tags: dict) -> None:
    """One Tune trial: validate the sampled values, open its nested MLflow run, fit one TorchTrainer."""
    import time

    import ray
    import ray.tune
    import ray.util.queue

    started_at = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = config_lib.build(base["task"], [config_lib.flatten(base), sampled])
    console.quiet(cfg.log.level)
    client = tracking.MlflowClient(uri)
    run_id, earlier = trial_run(client, experiment, sweep, trial_id, parent,
                                {**init_tags, tracking.TASK_TAG: cfg.task, tracking.SEARCHED_TAG: ",".join(sorted(config_lib.flatten(sampled)))})
    if earlier is not None and earlier.info.status == "FINISHED":
        # It ended before its driver died, after the sweep's state was last saved: Tune restored
        # it unfinished. It is not trained again; Tune (and through it Optuna, if the dead driver
        # had not told it) gets the result the run ended with.
        ray.tune.report(dict(earlier.data.metrics))
        return
    # Only a clean finish is ended here. An error, or Tune stopping the trial (ASHA, the sweep's
    # end), is settled by the sweep's driver from Tune's verdict (finish_trial_runs): a trial
    # that Tune stops is torn down mid-write, and its own guess (FAILED) could land after the
    # driver's FINISHED.
    # A resumed trial's run keeps the values it started with (MLflow refuses changed params: a
    # resume may change tune.resume, tune.max_concurrent, ...; see CHANGEABLE_ON_RESUME).
    logged = earlier.data.params if earlier is not None else {}
    tracking.log_params(client, run_id, {k: v for k, v in config_lib.flatten(config_lib.to_dict(cfg)).items()
                                         if k not in logged})
    if cfg.tune.scheduler == "pbt" and earlier is None:  # the values' history starts with its first ones
        from platform import pbt

        space = runs.recorded_space(client.get_run(parent))
        tracking.log_metrics(client, run_id, pbt.value_metrics(config_lib.flatten(sampled), space), step=0)
    tracking.log_text(client, run_id, config_lib.to_yaml(cfg), "config.yaml")
    log_datasets(client, run_id, adapt.splits_of(shards, cfg))
    tracking.set_tags(client, run_id, {"platform.driver_node": ray.get_runtime_context().get_node_id()})
    if cluster.in_process(cfg.scaling):
        # Trains right here, in the trial's own process, which Tune keeps for the next trial.
        config = loop_config(cfg, shards, mlflow_run_id=run_id, tracking_uri=uri, in_memory=in_memory,
                             started_at=started_at)
        if cfg.tune.trial_timeout_s:  # checked at each step: a thread left running would outlive the trial
            config["deadline"] = started_at + cfg.tune.trial_timeout_s
        train_in_process(config, cfg, streamed(shards, in_memory))
    else:
        name, resume_from = f"{sweep}-{trial_id}", None
        if cfg.tune.scheduler == "pbt" and (resume_from := ray.tune.get_checkpoint()) is not None:
            # Its Train run goes on from the checkpoint PBT gives it, which may be another trial's:
            # a Train run of its own per checkpoint (one that has its own would resume from those).
            import hashlib

            name += "-" + hashlib.sha1(str(resume_from.path).encode()).hexdigest()[:10]
        # The run's controller hands each epoch to the trial, which reports it to Tune: with its
        # checkpoint under PBT (which moves weights between trials as Tune checkpoints), and with
        # the controller's handle, so that a trial Tune stops aborts its run (trial_trainable).
        reports = ray.util.queue.Queue(1, actor_options={"num_cpus": 0})
        trainer = make_trainer(cfg, shards, name=name, mlflow_run_id=run_id, tracking_uri=uri,
                               callbacks=[epoch_reports(reports)], in_memory=in_memory, started_at=started_at,
                               resume_from=resume_from)
        result = fit_within(trainer, cfg.tune.trial_timeout_s, reports, checkpoints=cfg.tune.scheduler == "pbt")
        if result.error:
            raise result.error
    tracking.end_run(client, run_id, "FINISHED", only_if_running=True)


def trial_run(client, experiment: str, sweep: str, trial_id: str, parent: str, tags: dict):
    """(run id, the run as an earlier attempt left it, or None): one MLflow run per trial, whatever
    happens; a resumed sweep's trial finds its run again and, unless it finished, continues it."""
    trial_tags = {tracking.SWEEP_TAG: sweep, tracking.TRIAL_TAG: trial_id}
    run_id = runs.find_run(client, experiment, trial_tags)
    if run_id is None:
        return tracking.start_run(client, experiment, f"{sweep}-{trial_id}", {**trial_tags, **tags}, parent=parent), None
    earlier = client.get_run(run_id)
    if earlier.info.status not in ("RUNNING", "FINISHED"):
        client.update_run(run_id, status="RUNNING")  # a resumed sweep continues the trial its driver left
    return run_id, earlier


def train_in_process(config: dict, cfg, datasets: dict) -> None:
    """The trial's run in its own process (``scaling.num_workers=0``), restarted in place from its
    latest epoch after an error, up to ``train.max_failures`` times (-1: always); a timeout is final.

    Tune does not retry these trials itself: it would retry a timeout too, each time with a fresh
    deadline, and with ``train.max_failures=-1`` forever.
    """
    import ray.tune

    from platform.loop import run_loop, tune_trial_session

    failures, resume_from = 0, ray.tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="deeplense-trial-") as kept:
        while True:
            try:
                # A copy of each epoch's checkpoint to restart from, only when a restart may come.
                keep = kept if cfg.train.max_failures != 0 else None
                return run_loop(config, tune_trial_session(cfg, datasets, resume_from, keep=keep))
            except TimeoutError:
                raise
            except Exception as error:
                failures += 1
                if 0 <= cfg.train.max_failures < failures:
                    raise
                if os.listdir(kept):
                    resume_from = ray.tune.Checkpoint.from_directory(kept)
                tracking.say(f"[{cfg.task}] {failure_reason(error)}; restarting from the latest checkpoint "
                             f"(failure {failures} of train.max_failures={cfg.train.max_failures})")


def explain_sweep(client, parent: str, objective: str, task, sweep: str) -> None:
    """The sweep's insight on its parent run (``platform.insight``); a failure there is a warning:
    the sweep's results stand, and the same command draws them again."""
    try:
        for line in insight.log_sweep_insight(client, parent, objective, task.mode):
            print(f"note: {line}")
    except Exception as error:
        print(f"warning: the sweep's insight failed ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
              f"retry with python -m platform.insight task={task.name} tune.name={sweep}", file=sys.stderr)


def epoch_reports(reports):
    """Ray Train's reports handed to the trial through ``reports`` (a Ray queue of one), each as
    (metrics, checkpoint, the run's controller), but for a checkpoint taken on a preemption
    warning: it is not an epoch, and an extra result would shift ASHA's rungs. In place of Ray's
    TuneReportCallback (which passes metrics through a queue of its own), so the trial holds its
    run's controller, and has the checkpoints PBT moves between trials."""
    import ray
    from ray.train.v2.api.callback import UserCallback

    from platform.loop import PREEMPTION_KEY

    class EpochReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if PREEMPTION_KEY not in metrics[0]:  # this runs in the run's controller: its handle goes too
                reports.put((metrics[0], checkpoint, ray.get_runtime_context().current_actor))  # waits for the last

    return EpochReports()


def fit_within(trainer, timeout_s: float, reports, checkpoints: bool = False):
    """``trainer.fit()``, failed with a TimeoutError after ``timeout_s`` seconds (0: no limit), each
    epoch from ``reports`` (``epoch_reports``' queue) reported to Tune, with its checkpoint when
    ``checkpoints`` (PBT's; otherwise Ray Train keeps them, and resumes the run from them).

    The fit runs in a thread the trial waits on: a stalled run reports nothing a Tune stopper
    could act on. The error fails the trial; Tune then stops it, and its clean-up aborts the
    Train run (``trial_trainable``).
    """
    import concurrent.futures
    import time

    import ray.tune
    from ray.util.queue import Empty

    deadline = time.monotonic() + (timeout_s or math.inf)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fit")
    try:
        fit = pool.submit(trainer.fit)
        while True:
            try:
                metrics, checkpoint, TRAIN_RUN["controller"] = reports.get(timeout=1.0)
            except Empty:
                if fit.done() and reports.empty():
                    break
            else:
                ray.tune.report(metrics, checkpoint=checkpoint if checkpoints else None)
            if time.monotonic() > deadline:
                raise concurrent.futures.TimeoutError
        result = fit.result()  # done: the loop ends only then
        TRAIN_RUN.pop("controller", None)  # ended by itself: nothing to abort
        return result
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"the trial ran past tune.trial_timeout_s={timeout_s:g} and was stopped") from None
    finally:
        pool.shutdown(wait=False)


TRAIN_RUN: dict = {}  # "controller": the handle of the Train run this trial's process waits on, while it runs


def trial_trainable(run):
    """Tune's trainable of ``run`` (``run_trial`` with its parameters): a trial that Tune stops while
    its Train run goes on (ASHA, a PBT exploit, the sweep's end) aborts that run before its process goes,
    so the run's workers and placement group are freed at once. Left to Ray, a detached cleaner frees
    them once it sees the run's controller dead, and on a loaded node it was seen not to: the CPUs
    stayed held, and the next trials' Train runs waited for them until the sweep was killed."""
    from ray.tune.trainable.function_trainable import wrap_function

    class Trial(wrap_function(run)):  # named as run is: trials stay run_trial_<id>
        def cleanup(self):
            try:
                super().cleanup()
            finally:
                abort_train_run()

    return Trial


def abort_train_run(timeout_s: float = 30) -> None:
    """Abort the Train run this trial's process waits on, if one is going (``TRAIN_RUN``)."""
    import ray

    controller = TRAIN_RUN.pop("controller", None)
    if controller is None:
        return
    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - it ended meanwhile, or its actor exits as it answers (abort's last step)
        pass


def trial_id_of(result) -> str | None:
    """A Tune result's trial id: in its metrics, or (a trial that failed before reporting) in its folder's name."""
    if result.metrics and result.metrics.get("trial_id"):
        return result.metrics["trial_id"]
    match = re.match(r"run_trial_([0-9a-f]+(?:_[0-9]+)?)_[0-9]+_", os.path.basename(str(result.path or "")))
    return match.group(1) if match else None


def failure_reason(error: BaseException) -> str:
    """One line for a failed trial: the innermost ``SomeError: message`` in Ray's wrapped traceback,
    a URI's password in it masked (it is printed and logged as a tag)."""
    lines = [tracking.redact(line.strip()) for line in str(error).splitlines()]
    named = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*: ", line)]
    return (named[-1] if named else next((line for line in lines if line), type(error).__name__))[:500]


def interrupted(path: str, results, num_samples: int) -> bool:
    """Whether Tune stopped early on a signal: trials missing, or (as its last saved state has
    them; its clean-up marks them TERMINATED in memory) trials neither finished nor failed."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    if len(results) < num_samples:
        return True
    return any(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in ExperimentAnalysis(path).trials)


def sweep_path(cfg, sweep: str) -> str:
    """Where Tune keeps the sweep's state (local folder or object storage URI)."""
    return storage_path(cfg).rstrip("/") + "/" + sweep


def study_storage(cfg, sweep: str):
    """The sweep's Optuna study storage: beside its Ray results (a local file: Optuna's RDB storage
    is SQL), so the same tune.name continues it."""
    import optuna

    os.makedirs(local_dir := sweep_folder(cfg, sweep), exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{os.path.join(local_dir, 'optuna.db')}")


def sweep_folder(cfg, sweep: str) -> str:
    """A local folder of the sweep's own (its study, its driver's lock): in its Ray results, or
    under the output folder where those are in object storage."""
    results = storage_path(cfg)
    return os.path.join(results if "://" not in results else os.path.join(config_lib.output_dir(), "optuna"), sweep)


def build_tuner(cfg, space, shards: dict, *, uri: str, experiment: str, parent: str, sweep: str,
                init_tags: dict | None = None, resume: str | None = None, samples: int | None = None,
                concurrent: int = 1, starts: list[dict] = ()):
    """A new Tuner of ``samples`` trials (also to go on with a sweep's parent run and study: resume
    "extend" or "restart"), or with ``resume`` "auto" or "force" the named sweep's, restored from
    its state."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from platform import pbt

    trainable = tune.with_resources(trial_trainable(
        tune.with_parameters(run_trial, base=config_lib.to_dict(cfg), shards=shards, in_memory=put_in_memory(cfg, shards),
                             uri=uri, experiment=experiment, parent=parent, sweep=sweep, init_tags=init_tags or {})),
        cluster.trial_resources(cfg.scaling))
    if resume in ("auto", "force"):
        # Finished trials stay finished; unfinished ones go on from their Train checkpoints;
        # the searcher (and with it the Optuna study) comes back from the saved state.
        return tune.Tuner.restore(sweep_path(cfg, sweep), trainable, resume_unfinished=True,
                                  resume_errored=resume == "force", restart_errored=False)
    task = registry.task_of(cfg)
    goals = objectives.objectives_of(cfg, task)
    samples = cfg.tune.num_samples if samples is None else samples
    param_space = None
    if cfg.tune.scheduler == "pbt":
        # Its first population drawn at random (Ray advises no model-based searcher beside PBT: the
        # values of a trial change as it trains); then PBT exploits and explores.
        search, param_space = pbt.first_population(space, cfg.tune.seed, starts)
        scheduler = pbt.LineagePBT(cfg, space, task, uri=uri, experiment=experiment, sweep=sweep)
    else:
        search = optuna_search(cfg, task, space, sweep, starts)
        scheduler = None
        if cfg.tune.scheduler == "asha":
            # max_t one past the last epoch: a trial that reaches the end finishes by itself
            # rather than being stopped (killed) by ASHA right after its last report. With several
            # objectives it stops trials on the first one (a val/ metric: objectives.check_search).
            scheduler = ASHAScheduler(metric=goals[0].metric, mode=goals[0].mode, time_attr="training_iteration",
                                      max_t=cfg.train.epochs + 1,
                                      grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                                      reduction_factor=cfg.tune.reduction_factor)
    in_process = cluster.in_process(cfg.scaling)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler,
                                    num_samples=samples,
                                    max_concurrent_trials=min(concurrent, samples),
                                    # Trials that train in their own process (scaling.num_workers=0) keep
                                    # it from trial to trial: no new process importing torch each time.
                                    reuse_actors=in_process),
        # Tune retries no trial: Ray Train restarts a run's lost workers, and an in-process trial
        # restarts itself (train_in_process), a timeout being final for both.
        run_config=tune.RunConfig(name=sweep, storage_path=storage_path(cfg),
                                  # Quiet: Tune's table with the task's columns, not a box per trial and result.
                                  **console.tune_output(),
                                  callbacks=[console.trial_table(list(space.params), goals[0].metric, goals[0].mode)]
                                  if console.is_quiet() else [],
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  # PBT keeps them all: a trial's checkpoint may be taken by another epochs
                                  # later, and PBT registers the one it saves a second time (whose
                                  # deletion then fails).
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=None if cfg.tune.scheduler == "pbt" else cfg.train.checkpoints_to_keep)),
    )


def optuna_search(cfg, task, space, sweep: str, starts: list[dict]):
    """Optuna's sampler (TPE, random or NSGA-II) over the space, define-by-run, behind Ray Tune,
    told each trial's value of the sweep's objectives and, with constraints, its excess over them."""
    import optuna

    from platform.searcher import SavedNSGAIISampler, TruthfulOptunaSearch

    storage = study_storage(cfg, sweep)
    try:
        earlier = len(storage.get_all_trials(storage.get_study_id_from_name(sweep)))
    except KeyError:
        earlier = 0
    # A continued study (same tune.name) goes on from its trials; a fresh seed keeps it from
    # drawing the same first points again.
    seed = cfg.tune.seed + earlier
    startup = cfg.tune.startup_trials or min(10, max(2, cfg.tune.num_samples // 3))
    constraints = objectives.constraints_of(cfg)  # told to Optuna with each trial (Trial.set_constraint)
    if cfg.tune.search == "tpe":  # several objectives: Optuna's TPE is MOTPE
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    elif cfg.tune.search == "nsga2":
        sampler = SavedNSGAIISampler(seed=seed, population_size=max(2, startup))
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    if cfg.tune.objectives:  # each at the trial's best epoch, as the kept model has it
        goals = objectives.objectives_of(cfg, task)
        metric = [objectives.AT_BEST + g.metric for g in goals]
        mode = [g.mode for g in goals]
        metric, mode = (metric[0], mode[0]) if len(goals) == 1 else (metric, mode)
    else:
        metric, mode = f"val/{task.objective(cfg)}", task.mode
    return TruthfulOptunaSearch(
        space=space_lib.define_by_run(space),
        metric=metric,
        mode=mode,
        sampler=sampler,
        study_name=sweep,
        storage=storage,
        points_to_evaluate=list(starts) or None,  # a warm start's: enqueued in the study, tried first
        epochs=cfg.train.epochs,
        stopped_as=cfg.tune.stopped_trials,
        constraints=constraints,
    )


def finish_trial_runs(client, experiment: str, sweep: str, results, epochs: int) -> None:
    """Make each trial's MLflow status agree with Tune's verdict.

    A trial ASHA stops is ended from outside, mid-``fit``: its run may still be RUNNING, or
    marked FAILED by the interruption. Tune knows whether it really failed.
    """
    errors = {trial_id_of(r): r.error for r in results}
    for run in runs.sweep_runs(client, experiment, sweep):
        trial_id = run.data.tags.get(tracking.TRIAL_TAG)
        if trial_id is None:
            continue  # the parent
        if trial_id in errors and errors[trial_id] is None:
            if run.data.metrics.get("epoch", 0) < epochs:
                tracking.set_tags(client, run.info.run_id, {tracking.STOPPED_TAG: "true"})
            if run.info.status != "FINISHED":
                tracking.end_run(client, run.info.run_id, "FINISHED")
        elif trial_id in errors:
            tracking.set_tags(client, run.info.run_id, {FAILURE_TAG: failure_reason(errors[trial_id])})
            if run.info.status != "FAILED":
                tracking.end_run(client, run.info.run_id, "FAILED")
        elif run.info.status == "RUNNING":
            tracking.end_run(client, run.info.run_id, "FAILED")


def end_open_trial_runs(client, experiment: str, sweep: str, status: str) -> None:
    for run in runs.sweep_runs(client, experiment, sweep, "RUNNING"):
        if tracking.TRIAL_TAG in run.data.tags:
            tracking.end_run(client, run.info.run_id, status)


SPACE_TAG = tracking.SPACE_TAG  # the sweep's search space, so a resume can refuse a changed one


def space_fingerprint(space) -> str:
    import json

    return json.dumps({"search": {k: p.recorded() for k, p in space.params.items()},
                       "fixed": space.fixed}, sort_keys=True, default=str)


def _space_change(before: str, after: str) -> str:
    import json

    old, new = json.loads(before), json.loads(after)
    changes = []
    for section in ("search", "fixed"):
        for key in sorted(set(old[section]) | set(new[section])):
            a, b = old[section].get(key, "(none)"), new[section].get(key, "(none)")
            if a != b:
                changes.append(f"{key}: {a} -> {b}")
    return "; ".join(changes)


# What a resumed sweep may change: where and how fast it runs, not what its trials train or measure.
CHANGEABLE_ON_RESUME = ("ray.", "mlflow.", "cost.", "log.", "tune.resume", "tune.num_samples", "tune.max_concurrent",
                        "tune.trial_timeout_s", "tune.space", "data.cache_dir", "train.max_failures",
                        "train.max_preemptions", "train.preemption_check_steps", "train.checkpoints_to_keep",
                        "train.checkpoint_every", "scaling.cpus_per_worker", "scaling.gpus_per_worker", "scaling.placement_strategy")


def setting_change(recorded: dict[str, str], cfg, searched=()) -> str | None:
    """The first setting this command gives another value than the sweep's parent run recorded, or None.

    Keys the sweep did not record (a newer platform's) are not compared; the space is compared
    apart (a searched key's param on the parent is the best trial's value). ``cfg`` holds what the
    data decided (``runner.data_and_settings``), compared like any other setting.
    """
    now = tracking.public_params(config_lib.flatten(config_lib.to_dict(cfg)))
    for key in sorted(recorded):
        if key in searched:
            continue
        if not key.startswith(CHANGEABLE_ON_RESUME) and key in now and now[key] != recorded[key]:
            return f"{key}={recorded[key]}; this command has {key}={now[key]}"
    return None


def resume_plan(cfg, client, experiment_name: str, sweep: str, space) -> tuple[str | None, object]:
    """(None, None) for a new sweep, or (tune.resume, parent run) to resume the named one.

    Decided before any work; a name that cannot be used as asked is a one-line error.
    """
    from ray import tune

    path = sweep_path(cfg, sweep)
    restorable = tune.Tuner.can_restore(path)
    parent = runs.sweep_parent(client, experiment_name, sweep)
    mode = cfg.tune.resume
    if mode == "never":
        if restorable or parent is not None:
            where = f"MLflow run {parent.info.run_id}" if parent is not None else path
            raise config_lib.ConfigError(f"tune.name={sweep} exists already ({where}) and tune.resume=never; resume it "
                                         f"with tune.resume=auto, or choose another tune.name")
        return None, None
    if not restorable:
        if mode == "force" and parent is None:
            raise config_lib.ConfigError(f"tune.resume=force: there is no sweep named {sweep} to resume (no Tune state "
                                         f"at {path}); leave tune.resume=auto to start it")
        if parent is not None and parent.info.status == "FINISHED":
            raise config_lib.ConfigError(f"tune.name={sweep} has finished (MLflow run {parent.info.run_id}); choose "
                                         f"another tune.name")
        if parent is None:
            return None, None
    finished = parent is not None and parent.info.status == "FINISHED"
    if mode == "auto" and finished:
        raise config_lib.ConfigError(f"tune.name={sweep} has finished (MLflow run {parent.info.run_id}); choose "
                                     f"another tune.name, or tune.resume=force to add tune.num_samples more trials "
                                     f"to it")
    recorded = parent.data.tags.get(SPACE_TAG) if parent is not None else None
    if recorded and recorded != space_fingerprint(space):
        raise config_lib.ConfigError(f"tune.name={sweep} was started with another search space "
                                     f"({_space_change(recorded, space_fingerprint(space))}); resume it with its own "
                                     f"space, or start a new sweep with another tune.name")
    change = setting_change(parent.data.params, cfg, space.params) if parent is not None else None
    if change:
        raise config_lib.ConfigError(f"tune.name={sweep} was started with {change}; resume it with its own "
                                     f"settings, or start a new sweep with another tune.name")
    # A finished sweep that is forced goes on with new trials: its Optuna study (TPE sees every
    # earlier trial) and its MLflow parent run continue. So does one whose driver died before
    # Tune first saved its state ("restart"), with the trials it still lacks.
    return ("extend" if finished else mode if restorable else "restart"), parent


def main(argv: list[str]) -> int:
    task, cfg, space, source, uri = checked_settings(argv)
    sweep = cfg.tune.name or default_name(cfg)
    experiment_name = cfg.mlflow.experiment or f"deeplense-{cfg.task}"
    starts = warm_start_points(cfg, task, space, uri, experiment_name)  # (points, the line saying so)
    shards, cfg, data_tags = built_data(task, cfg, space)  # before the resume check: what the data decided is compared too
    objectives.check_logged(cfg, task, lambda: metrics_logged(task, cfg, shards["val"]))
    cfg = settled(cfg, shards, min(cfg.tune.num_samples, cfg.tune.max_concurrent or cfg.tune.num_samples))
    resume, earlier = resume_plan(cfg, tracking.MlflowClient(uri) if tracking.store_exists(uri) else None,
                                  experiment_name, sweep, space)
    with driver_lock(cfg, sweep):  # every check passed: this driver's sweep, or a one-line refusal
        return run_sweep(task, cfg, space, source, uri, sweep, shards, data_tags, resume, earlier,
                         starts if not resume else ([], ""))  # a resumed sweep's study has them already


WARM_START_TAG = "platform.warm_start"  # on a sweep's parent run: the sweep it started from


def warm_start_points(cfg, task, space, uri: str, experiment_name: str) -> tuple[list[dict], str]:
    """The best ``tune.warm_start_top`` configurations of the sweep ``tune.warm_start`` (same task),
    as this space's values, best first: the first trials this sweep runs; and a line saying so. A key
    this space no longer searches, or a value outside its range, is dropped (the line names it); no
    such sweep is a one-line error."""
    name = cfg.tune.warm_start
    if not name:
        return [], ""
    client = tracking.MlflowClient(uri) if tracking.store_exists(uri) else None
    parent = runs.sweep_parent(client, experiment_name, name)
    if parent is None:
        raise config_lib.ConfigError(f"tune.warm_start={name}: no sweep of that name in experiment {experiment_name} "
                                     f"of {uri}; expected the tune.name of an earlier sweep of task {task.name}")
    if parent.data.tags.get(tracking.TASK_TAG, task.name) != task.name:
        raise config_lib.ConfigError(f"tune.warm_start={name} is a sweep of task {parent.data.tags[tracking.TASK_TAG]}; "
                                     f"expected a sweep of task {task.name}")
    objective = runs.sweep_objective(client, parent) or task.objective(cfg)
    scored = sorted((r for r in insight.trial_rows(client, parent, objective)
                     if r["state"] in ("COMPLETE", "STOPPED_EARLY") and math.isfinite(r[f"best/{objective}"])),
                    key=lambda r: r[f"best/{objective}"], reverse=task.mode == "max")[:cfg.tune.warm_start_top]
    if not scored:
        raise config_lib.ConfigError(f"tune.warm_start={name}: none of its trials reached a value of best/{objective} "
                                     f"to start from")
    old = runs.recorded_space(parent)
    gone = sorted(set(old) - set(space.params))
    points, outside = [], set()
    for row in scored:
        point = {}
        for key, value in row.items():
            if key not in space.params or key not in old or value is None:
                continue
            if space_lib.allows(space.params[key], value):
                point[key] = value
            else:
                outside.add(key)
        points.append(point)
    values = ", ".join(f"{r[f'best/{objective}']:.4g}" for r in scored)
    note = (f"warm start from sweep {name}: its {len(points)} best configurations first (best/{objective} {values})"
            + (f"; not searched here any more, dropped: {', '.join(gone)}" if gone else "")
            + (f"; outside this space's ranges, dropped: {', '.join(sorted(outside))}" if outside else ""))
    return points, note


@contextlib.contextmanager
def driver_lock(cfg, sweep: str):
    """The sweep's one driver: a second command with its tune.name is refused while the first runs.

    An OS lock on a file in the sweep's folder, which the kernel drops when its process dies however
    it dies (a SIGKILL too): nothing stale to clean up. One machine's: drivers run on the head.
    """
    import datetime
    import fcntl
    import socket

    os.makedirs(folder := sweep_folder(cfg, sweep), exist_ok=True)
    path = os.path.join(folder, "driver.lock")
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise config_lib.ConfigError(f"tune.name={sweep} is running already ({holder} holds {path}); wait for it "
                                         f"to end or stop it, or choose another tune.name") from None
        lock.truncate(0)
        lock.write(f"platform.tune pid {os.getpid()} on {socket.gethostname()} since "
                   f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_sweep(task, cfg, space, source, uri: str, sweep: str, shards: dict, data_tags: dict, resume: str | None,
              earlier, starts: tuple[list[dict], str] = ([], "")) -> int:
    """The sweep, once every check has passed: its parent run, its trials, its best trial kept."""
    print(config_lib.to_yaml(cfg) + space_lib.describe(space), flush=True)
    cluster.connect(cfg.ray.address)
    capacity = cluster.trial_capacity(cfg.scaling, cfg.tune.max_concurrent, reads_with_ray_data(cfg, shards))  # a trial no node holds: refused here
    print(capacity.reason, flush=True)
    # The trials' runs have them too.
    init_tags = {**provenance.source_tags(), **(source.tags() if source else {}), **data_tags}
    client, experiment, parent = open_sweep(cfg, uri, sweep, space, resume, earlier, init_tags)
    tracking.set_tags(client, parent, objectives.sweep_tags(cfg, task))
    starts, note = starts
    if starts:
        print(note, flush=True)
        tracking.set_tags(client, parent, {WARM_START_TAG: cfg.tune.warm_start})
    with cli.ends_run(client, parent):
        if resume in (None, "restart"):
            # The searched keys are left for the best trial's values, at the end (insight); a restart
            # keeps the values its first command logged (a resume may change a few, MLflow none).
            logged = earlier.data.params if earlier is not None else {}
            tracking.log_params(client, parent, {k: v for k, v in config_lib.flatten(config_lib.to_dict(cfg)).items()
                                                 if k not in space.params and k not in logged})
            tracking.log_text(client, parent, config_lib.to_yaml(cfg) + space_lib.describe(space), "sweep.yaml")
            log_data(client, parent, shards)
        try:
            results = fit_sweep(cfg, space, shards, uri=uri, experiment=experiment, parent=parent, sweep=sweep,
                                init_tags=init_tags, resume=resume, client=client, concurrent=capacity.trials,
                                starts=starts)
        finally:  # what the trials spent, also for a sweep that stops part-way
            log_sweep_cost(client, experiment, parent, cfg.cost.hourly, capacity.node_types)
        keep_best_trial(cfg, task, space, shards, results, client=client, uri=uri, experiment=experiment,
                        parent=parent, sweep=sweep)
    return 0


def checked_settings(argv: list[str]):
    """(task, config, search space, init_from source, MLflow URI), every one checked before any work."""
    task_name, overrides = config_lib.parse_cli(argv)
    given_task = task_name if any(a.startswith("task=") for a in argv) else None
    recorded_task, recorded = provenance.from_run(  # a run's recorded config as the sweep's fixed settings
        overrides, tracking.tracking_uri(str(overrides.get("mlflow.tracking_uri", ""))), given_task)
    task = registry.get(recorded_task or task_name)
    space = space_lib.load(overrides.get("tune.space") or space_lib.default_path(task), task.name, overrides)
    fixed = {**space.fixed, **recorded}
    cfg = config_lib.build(task.name, [fixed, overrides])
    console.quiet(cfg.log.level)
    if cfg.train.compare_random_init:
        raise config_lib.ConfigError("train.compare_random_init=true is for python -m platform.train (a pretrained "
                                     "and a random start side by side), not for sweeps")
    objectives.check_search(cfg, registry.task_of(cfg))
    adapt.check(registry.task_of(cfg), cfg, space)
    if cfg.tune.scheduler == "pbt":
        from platform import pbt

        pbt.check(cfg, registry.task_of(cfg), space)
    cluster.check_fits(cfg.scaling, cfg.ray.address)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    source = pretrained.source_for(cfg, uri)  # init_from checked before any work; linked in MLflow
    inherited = pretrained.inherited(task, source, uri, given=set(overrides) | set(fixed))
    if inherited:
        print(pretrained.describe_inherited(inherited, source))
    # Trials run in their own working directories: every path they get must be absolute.
    layers = [inherited or {}, fixed, overrides]
    cfg = config_lib.build(task.name, [*layers, {"train.storage_path": storage_path(config_lib.build(task.name, layers))}])
    return registry.task_of(cfg), cfg, space, source, uri


def open_sweep(cfg, uri: str, sweep: str, space, resume: str | None, earlier, init_tags: dict):
    """(client, experiment id, parent run id): a new sweep's parent run, or the resumed one's, going on."""
    if not resume:
        return open_run(cfg, uri, sweep, {tracking.SWEEP_TAG: sweep, tracking.KIND_TAG: "sweep",
                                          SPACE_TAG: space_fingerprint(space), **init_tags})
    cluster.connect(cfg.ray.address)
    client = tracking.MlflowClient(uri)
    experiment, parent = earlier.info.experiment_id, earlier.info.run_id
    client.update_run(parent, status="RUNNING")  # the same parent run goes on
    # What the last driver left RUNNING is dead (one driver per sweep: driver_lock); a trial that
    # Tune resumes sets its run RUNNING again.
    end_open_trial_runs(client, experiment, sweep, "KILLED")
    resumed = int(earlier.data.tags.get("platform.resumed", "0")) + 1
    tracking.set_tags(client, parent, {"platform.resumed": resumed})
    doing = "adding trials to" if resume == "extend" else "resuming"
    print(f"{doing} sweep {sweep} ({sweep_path(cfg, sweep)}; MLflow parent run {parent})", flush=True)
    return client, experiment, parent


def fit_sweep(cfg, space, shards: dict, *, uri: str, experiment: str, parent: str, sweep: str, init_tags: dict,
              resume: str | None, client, concurrent: int = 1, starts: list[dict] = ()):
    """Tune's results of the sweep's trials, each trial's MLflow run ended as Tune saw it end."""
    # A SIGTERM (ray job stop, a cluster going down) is a Ctrl+C to Tune: it stops the
    # trials, saves the sweep's state and returns, so the same command resumes it.
    samples = cfg.tune.num_samples
    if resume == "restart":  # the trials its dead driver finished count
        samples -= len(runs.trial_runs(client, experiment, parent, "FINISHED"))
        if samples <= 0:
            settle_study(cfg, sweep)
            return []
    # Tune saves the sweep's state every 10 s or more; a driver killed outright (no chance to save)
    # loses the trials started since, which the next command must settle and draw again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        results = build_tuner(cfg, space, shards, uri=uri, experiment=experiment, parent=parent, sweep=sweep,
                              init_tags=init_tags, resume=resume, samples=samples, concurrent=concurrent,
                              starts=starts).fit()
    except BaseException as error:  # the trials' runs end with the sweep's, never left RUNNING
        end_open_trial_runs(client, experiment, sweep, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if interrupted(sweep_path(cfg, sweep), results, samples):
        end_open_trial_runs(client, experiment, sweep, "KILLED")
        print(f"sweep {sweep} interrupted; its state is saved: run the same command again to resume it "
              f"(tune.name={sweep})", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    finish_trial_runs(client, experiment, sweep, results, cfg.train.epochs)
    settle_study(cfg, sweep)
    return results


def log_sweep_cost(client, experiment: str, parent: str, hourly: dict, node_types: dict) -> None:
    """The node-hours, GPU-hours and estimated dollars of every trial under the parent run, on it."""
    try:
        trials = [r.data.metrics for r in runs.trial_runs(client, experiment, parent)]
    except Exception as error:  # noqa: BLE001 - the sweep's own outcome matters more than its bill
        print(f"the sweep's cost is not summed: {tracking._one_line(error)}", file=sys.stderr)
        return
    totals = cost.sweep_totals(trials, hourly, node_types)
    if any(k.startswith(cost.NODE_HOURS) for k in totals):
        tracking.log_metrics(client, parent, totals, step=0)
        print(f"cost: {cost.describe(totals)}", flush=True)


def settle_study(cfg, sweep: str) -> None:
    """Fail the study's trials still RUNNING once every trial of the sweep has ended: the ones a
    killed driver had asked for after Tune last saved its state, which no driver will finish."""
    from optuna.trial import TrialState

    storage = study_storage(cfg, sweep)
    try:
        study = storage.get_study_id_from_name(sweep)
    except KeyError:  # a PBT sweep's population is drawn without Optuna
        return
    for trial in storage.get_all_trials(study, deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "platform.failure", "its sweep's driver was killed")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def no_trial_finished(sweep: str, metric: str, reasons: list[str]) -> str:
    """Why a sweep kept no model, in one line, with the command that gets further."""
    if any("'platform' is not a package" in reason for reason in reasons):
        # `ray job submit` without --working-dir from a head whose nodes do not hold this project:
        # the trials' processes found the standard library's module of that name.
        command = " ".join(provenance.invoked) or "python -m platform.tune ..."
        return (f"the trials of sweep {sweep} could not import the platform (their nodes do not have "
                f"{PROJECT_ROOT}); submit it from your checkout with "
                f"`ray job submit --working-dir . -- {command}`")
    return (f"no trial of sweep {sweep} finished with {metric}; see the trial errors above (tune.resume=force "
            f"runs the failed ones again from their checkpoints)")


def sweep_note(cfg, task, sweep: str, trials: int, best_trial: str, best_run: str, value: float, test: dict,
               front: int = 0) -> str:
    """The parent run's description (the MLflow note on its page): what was swept on what data, the
    best trial's val and test numbers, and the commands that reproduce the sweep and its best model."""
    objective = task.objective(cfg)
    data = (f"the folder {cfg.data.path}" if cfg.data.path else
            f"simulated {cfg.data.preset} ({cfg.data.num_train} train / {cfg.data.num_val} val / "
            f"{cfg.data.num_test or cfg.data.num_val} test images, data.seed={cfg.data.seed})")
    tags = provenance.source_tags()
    commit = tags.get("mlflow.source.git.commit", "")
    test_value = test.get(f"test/{objective}", float("nan"))
    return (f"**{cfg.task}** sweep `{sweep}`: {trials} trials ({cfg.tune.search} search, {cfg.tune.scheduler} "
            f"stopping, tune.seed={cfg.tune.seed}) on {data}.\n\n"
            + (f"Objectives {', '.join(cfg.tune.objectives)}"
               + (f" within {', '.join(cfg.tune.constraints)}" if cfg.tune.constraints else "")
               + f": {front} trials on the Pareto front (tag {objectives.PARETO_TAG}); kept by tune.pick="
               f"{cfg.tune.pick}, {objectives.PICK_RULES[cfg.tune.pick]}.\n\n" if front else "")
            + f"{'Kept' if front else 'Best'} trial {best_trial} (run `{best_run}`), chosen on val: val/{objective} = {value:.4f}; "
            f"test/{objective} = {test_value:.4f} (the test split, scored once, for this trial alone).\n\n"
            f"Reproduce the sweep: `{tags.get(provenance.COMMAND_TAG, 'python -m platform.tune task=' + cfg.task)}`"
            + (f" at commit `{commit[:12]}`" if commit else "")
            + f"; the best model alone: `python -m platform.train from_run={best_run}`.")


def keep_best_trial(cfg, task, space, shards: dict, results, *, client, uri: str, experiment: str, parent: str,
                    sweep: str) -> None:
    """The best trial's model registered, its values on the parent run, the sweep's insight and summary."""
    from platform.explain import wanted

    objective = task.objective(cfg)
    metric = f"val/{objective}"
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"trial {trial_id_of(r)} failed: {failure_reason(r.error)}")
    # The best trial as MLflow records it, over every trial under this parent run (an
    # extended sweep's earlier ones too): the UI, the registered weights and the parent
    # agree even when a stopped trial logged one more epoch than Tune saw.
    front = []
    if cfg.tune.objectives or cfg.tune.constraints:  # the Pareto trial tune.pick chooses
        best_run, front, why_none = pareto_pick(cfg, task, client, parent)
        value = client.get_run(best_run).data.metrics.get(f"best/{objective}", math.nan) if best_run else None
    else:
        best_run, value = runs.best_trial_run(client, experiment, parent, f"best/{objective}", task.mode)
        why_none = None
    if best_run is None:
        explain_sweep(client, parent, objective, task, sweep)  # its trials table says why each failed
        raise cli.CommandFailed(why_none or no_trial_finished(sweep, metric, [failure_reason(r.error) for r in failed]))
    best = client.get_run(best_run).data
    best_trial = best.tags[tracking.TRIAL_TAG]
    sampled = space_lib.sampled_params(space.params, best.params)  # a conditional key: if its condition held
    best_cfg = config_lib.build(task.name, [config_lib.flatten(config_lib.to_dict(cfg)), sampled])
    # A best trial that ASHA stopped before its last epoch has not drawn its Grad-CAM and embedding figures.
    views_missing = wanted(task, cfg) and tracking.VIEWS_TAG not in best.tags
    # The test split is scored once, for this trial alone: the sweep chose it on val.
    version, test = log_best_model(client, best_run, best_cfg, task, shards, cfg.mlflow.register_model,
                                   with_views=views_missing, parent=parent)
    tracking.log_metrics(client, parent, {f"best/{objective}": value}, step=0)
    tracking.set_tags(client, parent, {"platform.best_run_id": best_run, "platform.best_trial": best_trial,
                                        "platform.registered_version": version or "",
                                        "mlflow.note.content": sweep_note(cfg, task, sweep, len(results), best_trial,
                                                                          best_run, value, test, len(front))})
    explain_sweep(client, parent, objective, task, sweep)
    kind = f"Kept trial (tune.pick={cfg.tune.pick})" if front else "Best trial"
    print(f"\n{len(results)} trials ({len(failed)} failed). {kind} {best_trial}: {metric} = {value:.4f}")
    for key, v in sorted(sampled.items()):
        print(f"  {key} = {v}")
    if front:
        goals = objectives.objectives_of(cfg, task)
        print(f"Pareto front ({len(front)} trials; kept by tune.pick={cfg.tune.pick}: "
              f"{objectives.PICK_RULES[cfg.tune.pick]}):")
        for row in front:
            print(f"  {'*' if row['run_id'] == best_run else ' '} trial {row['trial_id']}  "
                  + "  ".join(f"{g.metric} {row[g.metric]:.4g}" for g in goals))
    print(f"MLflow parent run {parent}, best run {best_run}"
          + (f", registered model {task.name} version {version}" if version else ""))
    print(cli.ui_hint(uri, experiment, parent))
    if cfg.tune.scheduler != "pbt":  # PBT draws its population without Optuna
        print(study_hint(cfg, sweep))


def pareto_pick(cfg, task, client, parent: str) -> tuple[str | None, list[dict], str | None]:
    """(the run id tune.pick chooses, the Pareto front's rows, why there is none): every Pareto trial
    tagged ``platform.pareto=true``."""
    goals, bounds = objectives.objectives_of(cfg, task), objectives.constraints_of(cfg)
    rows = runs.pareto_trials(client, client.get_run(parent), goals, bounds)
    front = [row for row in rows if row["pareto"]]
    for row in front:
        tracking.set_tags(client, row["run_id"], {objectives.PARETO_TAG: "true"})
    chosen = objectives.picked(rows, goals, cfg.tune.pick)
    why = None
    if chosen is None and rows:
        why = (f"none of the {len(rows)} finished trials met tune.constraints="
               f"[{','.join(cfg.tune.constraints)}] with a value of every objective; widen the constraints or "
               f"search a space that can meet them")
    return (chosen["run_id"] if chosen else None), front, why


def study_hint(cfg, sweep: str) -> str:
    """How to open the sweep's Optuna study in optuna-dashboard, on this machine's loopback."""
    path = os.path.join(sweep_folder(cfg, sweep), "optuna.db")
    return (f"Optuna study: optuna-dashboard sqlite:///{path} --host 127.0.0.1   (study {sweep}; "
            f"pip install optuna-dashboard) then open http://127.0.0.1:8080")


if __name__ == "__main__":
    cli.exit_with(main)
