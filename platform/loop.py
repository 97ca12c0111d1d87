"""The recipe every worker runs, for every task, on one CPU worker or many GPUs:

    run = setup(loop_config, session)             the model, optimiser, schedule, precision; a resume
    for epoch in range(run.start_epoch, epochs):
        trained = train_epoch(run, epoch)         the steps (a checkpoint on a preemption warning)
        validated = validate(run, ...)            val outputs gathered to rank 0, its metrics shared
        end_epoch(run, epoch, trained, validated) the best weights, the checkpoint, the record, the report

It owns what a task should not care about: devices, DDP, mixed precision, clipping, the
learning-rate schedule, seeds, checkpoint and resume, gathering evaluation outputs over workers,
reporting to Ray, and (rank 0, through ``tracking.EpochLogger``) the MLflow run and the console.
The task supplies ``build_model``, ``collate``, ``train_step``, ``eval_step``, ``evaluate`` and
``plots``. It runs on Ray Train's workers, or (``scaling.num_workers=0``) in the run's own process:
the ``Session`` says which, and where its reports and checkpoints go.

Host syncs are kept to one per epoch (the running loss is summed on the device), plus one every
``train.preemption_check_steps`` steps, where the ranks agree whether to checkpoint early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from platform import config as config_lib
from platform import adapt, cluster, console, cost, explain, objectives, preemption, pretrained, registry, tracking
from platform.data import batches as batches_lib
from platform.data.shards import decode_images

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"
# train.checkpoint_every=auto: training between two checkpoints, in multiples of what the last one
# cost; before the first, its cost is guessed from its size at a slow disk's speed (this 2-core
# machine wrote 116-128 MB/s when its disk was busy, several GB/s when not).
CHECKPOINT_SPACING = 10
GUESSED_WRITE_BYTES_PER_S = 100e6
PREEMPTION_KEY = "preemption"  # in a report that only carries a checkpoint taken on a preemption warning


@dataclasses.dataclass
class Session:
    """What the loop needs from whoever runs it: a Ray Train worker's context, or a Tune trial
    that trains in its own process (``scaling.num_workers=0``)."""

    rank: int
    world_size: int
    device: torch.device
    report: Callable  # (metrics, checkpoint=None, checkpoint_dir_name=None)
    get_checkpoint: Callable  # () -> the checkpoint to resume from, or None
    checkpoint_from: Callable  # folder -> a checkpoint report() takes
    dataset_shard: Callable  # split -> this worker's Ray Data shard of a split not held in memory
    prepare_model: Callable  # (model, DDP options) -> the model to train


def ray_train_session(start_from=None) -> Session:
    """Inside a Ray Train worker (or Ray Train's local mode, for ``platform.train``). ``start_from``:
    the checkpoint to begin with when the Train run has none of its own (Train V2 has no
    ``resume_from_checkpoint``)."""
    context = ray.train.get_context()
    return Session(
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=ray.train.torch.get_device(),
        report=ray.train.report, get_checkpoint=lambda: ray.train.get_checkpoint() or start_from,
        checkpoint_from=ray.train.Checkpoint.from_directory, dataset_shard=ray.train.get_dataset_shard,
        prepare_model=lambda model, ddp: ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp))


def tune_trial_session(cfg, datasets: dict, resume_from=None, keep: str | None = None) -> Session:
    """Inside a Tune trial's own process: Ray forbids Ray Train's calls there, and has no use for
    them: one process, no DDP. ``resume_from``: the checkpoint to start from; ``keep``: a folder
    that always holds a copy of the latest epoch's checkpoint, for the trial to restart from in place."""
    from ray import tune

    def report(metrics, checkpoint=None, checkpoint_dir_name=None):
        tune.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None and keep:
            shutil.copytree(checkpoint.path, keep, dirs_exist_ok=True)

    # Ray gave the trial its GPU (CUDA_VISIBLE_DEVICES): the first one visible is it.
    device = torch.device("cuda", 0) if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    return Session(
        rank=0, world_size=1, device=device, report=report, get_checkpoint=lambda: resume_from,
        checkpoint_from=tune.Checkpoint.from_directory, dataset_shard=datasets.__getitem__,
        prepare_model=lambda model, ddp: model.to(device))


@dataclasses.dataclass
class Run:
    """One worker's run: what ``setup`` builds, each epoch updates, and a checkpoint holds."""

    cfg: Any
    task: registry.Task
    session: Session
    model: torch.nn.Module  # DDP-wrapped on several workers: ``unwrap`` for the task's own module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # autocast's, or None for fp32
    channels_last: bool  # images (and the model's weights) in channels-last layout (train.memory_format)
    train_batches: batches_lib.Batches
    val_batches: batches_lib.Batches
    logger: tracking.EpochLogger | None  # rank 0's record of the run; None on the other ranks
    meter: cost.Meter | None  # rank 0's count of the node time the run's workers hold
    check_every: int  # steps between preemption checks; 0: none
    deadline: float | None  # an in-process trial's tune.trial_timeout_s, as a wall-clock time
    started_at: float | None  # when the run began (the driver's clock), for time/to_first_step_s
    model_params: int = 0  # logged as model/params (platform/objectives.py)
    adapter: adapt.Adapter | None = None  # adapt.method's; its target images come from adapt_batches
    adapt_batches: batches_lib.Batches | None = None
    total_steps: int = 1  # optimiser steps in the whole run: the progress that DANN's ramp follows
    best_unlogged: bool = False  # best weights restored from a checkpoint, not yet in this run's MLflow record
    start_epoch: int = 0
    best: float | None = None  # the best val/<objective> so far, and its epoch and weights
    best_epoch: int = 0
    best_state: dict | None = None
    best_metrics: dict = dataclasses.field(default_factory=dict)  # the best epoch's
    skip_steps: int = 0  # a checkpoint taken mid-epoch (a preemption) resumes at its step ...
    partial: dict | None = None  # ... with the loss sums of the steps before it
    saved_for_drain: bool = False
    first_step_at: float | None = None
    training_since: float = dataclasses.field(default_factory=time.perf_counter)  # this attempt's start
    checkpointed_at: float | None = None  # when rank 0's latest epoch checkpoint was in storage ...
    checkpoint_cost: float | None = None  # ... and the seconds it took to write and hand over

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world_size(self) -> int:
        return self.session.world_size

    @property
    def device(self) -> torch.device:
        return self.session.device


@dataclasses.dataclass
class Trained:
    """One epoch's training: the loss and samples over every rank; this rank's steps and seconds."""

    loss: float
    samples: int
    steps: int
    seconds: float  # training only; a run resumed mid-epoch counts the part before its restart
    started: float  # time.perf_counter() at the epoch's start: evaluation and logging count for the ETA
    adapt_loss: float | None = None  # the domain-adaptation loss's mean (adapt.method), None without


@dataclasses.dataclass
class Validated:
    """One pass over the val split: its metrics on every rank; the rest on rank 0 only."""

    metrics: dict[str, float]  # "val/<name>" -> value, computed once from every val row
    outputs: dict[str, np.ndarray] | None  # every val row's eval_step outputs, for the task's plots
    plot_batch: dict | None  # the first collated val batch, for the task's plots
    view_rows: dict  # val rows for the end-of-run views (explain)
    images_per_s: float  # this rank's forward passes alone: model/images_per_s


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point, on each worker."""
    run_loop(loop_config, ray_train_session(loop_config.get("start_from")))


def run_loop(loop_config: dict, session: Session) -> None:
    run = setup(loop_config, session)
    # The machine as the run used it (CPU, memory, its GPUs), on its MLflow run, from rank 0.
    system = tracking.watch_system(run.logger.run_id, loop_config["tracking_uri"], run.cfg.mlflow.system_metrics_s) \
        if run.logger and run.logger.client else None
    try:
        for epoch in range(run.start_epoch, run.cfg.train.epochs):
            trained = train_epoch(run, epoch)
            last = epoch + 1 == run.cfg.train.epochs
            validated = validate(run, view_rows=run.cfg.plots.samples if last and run.rank == 0 else 0)
            end_epoch(run, epoch, trained, validated)
    finally:
        if system:
            tracking.stop_watching(system)


# --- setup ---------------------------------------------------------------------------------------

def setup(loop_config: dict, session: Session) -> Run:
    """The run on this worker: its model (pretrained or resumed), optimiser, schedule, precision and data."""
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = config_lib.from_dict(loop_config["cfg"])
    console.quiet(cfg.log.level)
    task = registry.task_of(cfg)
    in_process = cluster.in_process(cfg.scaling)
    if in_process:  # a Ray Train worker gets these threads from its resources; this process trains itself
        torch.set_num_threads(max(1, int(cluster.cpus_of(cfg.scaling))))
    logger = None
    if session.rank == 0:
        run_id = loop_config.get("mlflow_run_id")
        client = tracking.MlflowClient(loop_config["tracking_uri"]) if run_id else None
        logger = tracking.EpochLogger(cfg.task, cfg.train.epochs, client, run_id, cfg.mlflow.outage_limit_s)
    gpus = cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0.0
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"  # no Ray: runner.without_ray
    where = all_gathered((node, os.getpid(),
                          *cost.where_this_runs(cluster.cpus_of(cfg.scaling), gpus), gpus), session.world_size)
    meter = logger.placement(where, loop_config.get("started_at")) if logger else None

    checkpoint = session.get_checkpoint()
    channels_last = cfg.train.memory_format == "channels_last" or (
        cfg.train.memory_format == "auto" and session.device.type == "cuda")
    model = build_model(task, cfg, session, loop_config["tracking_uri"], logger, pretrained_start=not checkpoint,
                        channels_last=channels_last)
    adapt_batches = worker_batches(adapt.SPLIT, loop_config, cfg, session) if cfg.adapt.method != "none" else None
    example = torch.zeros((2, *loop_config["image_shape"]), device=session.device)  # (2, C, H, W): the features' width
    adapter = adapt.build(task, cfg, unwrap(model), example, session.prepare_model) if adapt_batches else None
    optimizer = build_optimizer([model] + ([adapter.head] if adapter and adapter.head else []), cfg.train)
    steps_per_epoch = max(1, math.ceil(loop_config["train_rows"] / session.world_size / cfg.train.batch_size))
    dtype = autocast_dtype(cfg.train.precision, session.device)
    # A spot VM's SIGTERM becomes a warning read at the next check, not the end of the process.
    # In-process runs have no worker to restart: Tune restarts the trial from its last epoch.
    check_every = 0 if in_process else cfg.train.preemption_check_steps
    if check_every and (why := preemption.catch_sigterm()):
        tracking.say(f"[{cfg.task}] rank {session.rank}: SIGTERM will end this worker without a checkpoint ({why})")
    run = Run(
        cfg=cfg, task=task, session=session, model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg.train)),
        scaler=torch.amp.GradScaler(session.device.type, enabled=dtype == torch.float16), dtype=dtype,
        channels_last=channels_last,
        train_batches=worker_batches("train", loop_config, cfg, session),
        val_batches=worker_batches("val", loop_config, cfg, session),
        logger=logger, meter=meter, check_every=check_every, deadline=loop_config.get("deadline"),
        started_at=loop_config.get("started_at"), model_params=sum(p.numel() for p in unwrap(model).parameters()),
        adapter=adapter, adapt_batches=adapt_batches, total_steps=steps_per_epoch * cfg.train.epochs)
    if checkpoint:
        restore(run, checkpoint)
    return run


def build_model(task, cfg, session: Session, tracking_uri: str, logger, pretrained_start: bool,
                channels_last: bool = False) -> torch.nn.Module:
    """The task's model, the same weights on every rank, from ``init_from`` on a fresh start, ready for DDP."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = task.build_model(cfg)
    if pretrained_start:  # a resumed run has its own weights already
        new = pretrained.initialise(model, task, cfg, tracking_uri)
        if new is not None and logger:
            logger.say(f"initialised from {cfg.init_from}; {len(new)} tensors not in it: "
                       f"{', '.join(new[:6])}{' ...' if len(new) > 6 else ''}")
    # A task that leaves some parameters without gradients in some steps (a frozen warm-up)
    # needs DDP to look for them; it costs a graph traversal per step, so only on request.
    ddp_options = {"find_unused_parameters": True} if task.find_unused_parameters else None
    if channels_last:  # 4-D weights (convolutions) in the layout of the images they meet
        model = model.to(memory_format=torch.channels_last)
    return session.prepare_model(model, ddp_options)


def seed_rank(seed: int, rank: int, epoch: int) -> None:
    """Each rank and epoch its own random numbers (masks, dropout, noise): N workers must not draw
    N copies of the same ones. Per epoch, so that a resumed run draws what an unbroken one would."""
    torch_seed, numpy_seed = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(numpy_seed))


def build_optimizer(modules: list[torch.nn.Module], train) -> torch.optim.Optimizer:
    """The model's optimiser (and a DANN domain head's: ``modules``)."""
    # No weight decay on biases and norm scales, as usual for AdamW on CNNs and ViTs.
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=train.lr)


def lr_factor(step: int, steps_per_epoch: int, train) -> float:
    warmup = train.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if train.schedule == "constant":
        return 1.0
    total = max(1, train.epochs * steps_per_epoch - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / total)))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def worker_batches(split: str, loop_config: dict, cfg, session: Session) -> batches_lib.Batches:
    """This worker's share of ``split``: from the object store when it was put there (or from this
    process's memory, a run without Ray), else streamed."""
    ref = loop_config["in_memory"].get(split)
    if ref is None:
        buffer_rows = min(loop_config["train_rows"], 4 * cfg.train.batch_size)
        return batches_lib.streamed(session.dataset_shard(split), cfg.train.batch_size, buffer_rows)
    columns = ref if isinstance(ref, dict) else ray.get(ref)  # held by this process itself (no Ray), or shared
    return batches_lib.from_memory(columns, session.rank, session.world_size, cfg.train.batch_size,
                                   equal=split in batches_lib.TRAINED)


def target_images(numpy_batch: dict, device: torch.device, channels_last: bool) -> torch.Tensor:
    """(B, C, H, W) float32 of a batch of the adapt split: images only (it has no labels)."""
    images = torch.from_numpy(np.array(decode_images(numpy_batch), dtype=np.float32))  # a writable copy
    return to_device({"image": images}, device, channels_last)["image"]


def endless(batches: batches_lib.Batches, seed: int):
    """A split's batches, epoch after epoch of it, each in its own seeded order: the target images
    every step takes one batch of, however many or few there are."""
    for cycle in itertools.count():
        empty = True
        for numpy_batch in batches(seed * 1000 + cycle):
            empty = False
            yield numpy_batch
        if empty:
            raise ValueError(f"{adapt.SPLIT}: this worker's share of the target images is empty; "
                             f"give adapt.path at least as many images as there are workers")


def restore(run: Run, checkpoint) -> None:
    """Continue from ``checkpoint``: the weights, optimiser, schedule and best so far; the step, if mid-epoch."""
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location=run.device, weights_only=True)
        run.best_state = torch.load(os.path.join(folder, BEST_FILE), map_location="cpu", weights_only=True)
    unwrap(run.model).load_state_dict(state["model"])
    if run.adapter and run.adapter.head is not None and "domain_head" in state:
        unwrap(run.adapter.head).load_state_dict(state["domain_head"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.start_epoch, run.best, run.best_epoch = state["epoch"], state["best"], state["best_epoch"]
    run.best_metrics = state.get("best_metrics", {})
    run.skip_steps, run.partial = state.get("step", 0), state.get("partial")
    # The optimiser's rates are this run's own: a trial that PBT exploited goes on from another
    # trial's state with new values (a resumed run's are the ones it saved).
    run.optimizer.param_groups[0]["weight_decay"] = run.cfg.train.weight_decay  # build_optimizer's decayed group
    run.scheduler.base_lrs = [run.cfg.train.lr] * len(run.optimizer.param_groups)
    for group, factor in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = run.cfg.train.lr, run.cfg.train.lr * factor(run.scheduler.last_epoch)
    # Under PBT they may be another trial's: the next epoch logs them as this run's best.
    run.best_unlogged = run.best_state is not None and run.cfg.tune.scheduler == "pbt"
    if run.logger and run.cfg.tune.scheduler == "pbt":
        # A PBT trial goes on from where its weights' trial was: the epochs after it are new ones.
        run.logger.logged = {e for e in run.logger.logged if e <= run.start_epoch}
    if run.logger:
        where = f" step {run.skip_steps}" if run.skip_steps else ""
        shown = f" (best val/{run.task.objective(run.cfg)}={run.best:.4f})" if run.best is not None else ""
        run.logger.say(f"resuming from epoch {run.start_epoch}{where}{shown}")


def save_state(run: Run, folder: str, epoch: int, step: int = 0, partial: dict | None = None):
    """Rank 0's checkpoint: ``epoch`` epochs done, and ``step`` steps into the next when mid-epoch."""
    state = {"model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch,
             "step": step, "partial": partial, "best": run.best, "best_epoch": run.best_epoch,
             "best_metrics": run.best_metrics}
    if run.adapter and run.adapter.head is not None:
        state["domain_head"] = unwrap(run.adapter.head).state_dict()
    torch.save(state, os.path.join(folder, STATE_FILE))
    torch.save(run.best_state, os.path.join(folder, BEST_FILE))
    return run.session.checkpoint_from(folder)


# --- train_epoch ---------------------------------------------------------------------------------

def train_epoch(run: Run, epoch: int) -> Trained:
    """One epoch of steps on this rank's share of ``train`` (the rest of it, when resumed mid-epoch)."""
    seed_rank(run.cfg.train.seed, run.rank, epoch)
    run.model.train()
    started = time.perf_counter()
    loss_sum, samples, seconds_before = torch.zeros((), device=run.device), 0, 0.0
    adapt_sum, adapt_steps = torch.zeros((), device=run.device), 0  # this attempt's steps (a mid-epoch resume's own)
    targets = endless(run.adapt_batches, shuffle_seed_of(run, epoch)) if run.adapter else None
    resumed_mid_epoch = epoch == run.start_epoch and run.partial
    if resumed_mid_epoch:
        seconds_before = run.partial["seconds"]
        if run.rank == 0:  # the sums over every rank up to the preemption, counted once
            loss_sum += run.partial["loss_sum"]
            samples = int(run.partial["samples"])
    steps = run.skip_steps if epoch == run.start_epoch else 0  # the batches trained before a preemption
    for numpy_batch in run.train_batches(shuffle_seed_of(run, epoch), steps):
        if run.deadline and time.time() > run.deadline:
            raise TimeoutError(f"the trial ran past tune.trial_timeout_s={run.cfg.tune.trial_timeout_s:g} and was stopped")
        if run.first_step_at is None and epoch == 0 and not run.skip_steps:
            run.first_step_at = time.time()
        batch = to_device(run.task.collate(numpy_batch, run.cfg, True), run.device, run.channels_last)
        batch["epoch"] = epoch  # 0-based, for schedules inside a task's loss
        target = target_images(next(targets), run.device, run.channels_last) if targets else None
        task_loss, adapt_loss = step(run, batch, target)
        loss_sum += task_loss
        adapt_sum += adapt_loss
        adapt_steps += 1
        samples += rows_in(numpy_batch)
        steps += 1
        if run.check_every and steps % run.check_every == 0:
            checkpoint_on_warning(run, epoch, steps, loss_sum, samples, seconds_before + time.perf_counter() - started)
    seconds = seconds_before + time.perf_counter() - started

    totals = torch.stack([loss_sum, torch.tensor(float(steps), device=run.device),
                          torch.tensor(float(samples), device=run.device), adapt_sum,
                          torch.tensor(float(adapt_steps), device=run.device)])
    if run.world_size > 1:
        dist.all_reduce(totals)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"train/loss became {loss} in epoch {epoch + 1}; lower train.lr or enable train.grad_clip")
    adapted = (totals[3] / totals[4].clamp(min=1)).item() if run.adapter else None
    return Trained(loss=loss, samples=int(totals[2].item()), steps=steps, seconds=seconds, started=started,
                   adapt_loss=adapted)


def shuffle_seed_of(run: Run, epoch: int) -> int:
    return run.cfg.train.seed * 1000 + epoch * 10 + run.rank


def step(run: Run, batch: dict, target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step, as nanoGPT's: forward under autocast, scaled backward, clip, step, schedule.
    ``target``: a batch of the target domain's images, for ``adapt.method``. Returns the task's loss
    and the adaptation's (0 without)."""
    adapt_loss = torch.zeros((), device=run.device)
    with autocast(run.device, run.dtype):
        if run.adapter:
            run.adapter.caught.clear()
        loss = run.task.train_step(run.model, batch, run.cfg)["loss"]
        if run.adapter:
            progress = run.scheduler.last_epoch / max(1, run.total_steps)  # steps taken over the run's steps
            adapt_loss = run.adapter.loss(unwrap(run.model), target, progress)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss + adapt_loss).backward()
    if run.cfg.train.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip)
        if run.adapter and run.adapter.head is not None:  # on its own: its gradients must not shrink the model's
            torch.nn.utils.clip_grad_norm_(run.adapter.head.parameters(), run.cfg.train.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.task.after_step:
        run.task.after_step(unwrap(run.model), run.cfg)
    return loss.detach().float(), adapt_loss.detach().float()


def checkpoint_on_warning(run: Run, epoch: int, steps: int, loss_sum: torch.Tensor, samples: int, seconds: float):
    """Collective, every ``check_every`` steps: on a SIGTERM or a first drain notice on any rank, a
    checkpoint at this step; the SIGTERMed rank then ends, for Ray Train to restart the group from it."""
    warned = preemption.warning(run.world_size, run.device)
    if not (warned == "SIGTERM" or (warned == "drain" and not run.saved_for_drain)):
        return
    sums = torch.stack([loss_sum, torch.tensor(float(samples), device=run.device)])
    if run.world_size > 1:
        dist.all_reduce(sums)
    partial = {"loss_sum": sums[0].item(), "samples": sums[1].item(), "seconds": seconds}
    with tempfile.TemporaryDirectory() as folder:
        saved = save_state(run, folder, epoch, steps, partial) if run.rank == 0 else None
        # Not an epoch's result: platform.tune does not pass it on to Tune.
        run.session.report({PREEMPTION_KEY: f"{warned} in epoch {epoch + 1} at step {steps}"},
                           checkpoint=saved, checkpoint_dir_name=f"epoch-{epoch:04d}-step-{steps:06d}")
    if run.logger:
        run.logger.say(f"preemption warning ({warned}): checkpoint saved in epoch {epoch + 1} at step {steps}")
    run.saved_for_drain = run.saved_for_drain or warned == "drain"
    if warned == "SIGTERM" and preemption.sigterm_received():
        raise preemption.Preempted(f"rank {run.rank} received SIGTERM; its run's checkpoint from epoch {epoch + 1} "
                                   f"step {steps} is saved and Ray Train restarts from it (train.max_failures)")


# --- validate ------------------------------------------------------------------------------------

def validate(run: Run, view_rows: int = 0) -> Validated:
    """The task's metrics over every val row, each scored once whatever the number of workers:
    each rank runs ``eval_step`` on its share, rank 0 gathers the outputs, computes the metrics
    once and shares them. ``view_rows``: also pick that many rows (``explain.ViewRows``)."""
    model = unwrap(run.model)  # no DDP collectives: the ranks' shares may differ by a batch
    model.eval()
    chunks, first_batch = [], None
    rows, forward_s = 0, 0.0  # model/images_per_s: forward passes alone, on this rank's device
    views = explain.view_rows(run.cfg, view_rows)
    with torch.no_grad(), autocast(run.device, run.dtype):
        for numpy_batch in run.val_batches(None):
            if view_rows and not views.full:
                views.add(numpy_batch)
            collated = run.task.collate(numpy_batch, run.cfg, False)
            first_batch = first_batch or collated
            batch = to_device(collated, run.device, run.channels_last)
            began = time.perf_counter()
            out = run.task.eval_step(model, batch, run.cfg)
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            forward_s, rows = forward_s + time.perf_counter() - began, rows + rows_in(numpy_batch)
            chunks.append(numpy_outputs(out))
    outputs = gathered_to_rank0(chunks, run.rank, run.world_size)
    metrics = None
    if run.rank == 0:
        metrics = {f"val/{k}": float(v) for k, v in run.task.evaluate(outputs, run.cfg).items()}
    metrics = from_rank0(metrics, run.world_size)
    return Validated(metrics, outputs if run.rank == 0 else None, first_batch, views.rows(),
                     rows / forward_s if forward_s > 0 else math.nan)


def numpy_outputs(out: dict) -> dict[str, np.ndarray]:
    """An ``eval_step``'s per-sample outputs as float numpy arrays on the CPU (what ``evaluate`` takes)."""
    return {k: v.detach().float().cpu().numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in out.items()}


def gathered_to_rank0(chunks: list[dict], rank: int, world_size: int) -> dict[str, np.ndarray] | None:
    """Per-batch outputs concatenated, over every rank, on rank 0 (None elsewhere)."""
    local = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    if world_size == 1:
        return local
    everyone = [None] * world_size if rank == 0 else None
    dist.gather_object(local, everyone, dst=0)
    if rank != 0:
        return None
    keys = next(d for d in everyone if d).keys()
    return {k: np.concatenate([d[k] for d in everyone if d]) for k in keys}


def from_rank0(value, world_size: int):
    """Rank 0's ``value`` on every rank."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gathered(value, world_size: int) -> list:
    """Every rank's ``value``, by rank."""
    if world_size == 1:
        return [value]
    everyone = [None] * world_size
    dist.all_gather_object(everyone, value)
    return everyone


# --- end_epoch -----------------------------------------------------------------------------------

def end_epoch(run: Run, epoch: int, trained: Trained, validated: Validated) -> None:
    """The epoch's metrics, the best weights so far, the checkpoint, the run's record and the report."""
    objective = run.task.objective(run.cfg)
    metrics = {**validated.metrics, "model/images_per_s": validated.images_per_s, "train/loss": trained.loss, "train/lr": run.scheduler.get_last_lr()[0],
               "train/samples_per_s": trained.samples / trained.seconds, "model/params": run.model_params,
               "epoch": epoch + 1}
    if epoch == 0 and run.first_step_at is not None and run.started_at is not None:
        # Start-up: the trainer built on the driver -> workers, data pipeline, model -> first batch.
        metrics["time/to_first_step_s"] = run.first_step_at - run.started_at
    if trained.adapt_loss is not None:
        metrics["train/adapt_loss"] = trained.adapt_loss
    if run.meter:
        metrics.update(run.meter.metrics())
    improved = is_better(metrics[f"val/{objective}"], run.best, run.task.mode)
    if improved:
        run.best, run.best_epoch = metrics[f"val/{objective}"], epoch + 1
        run.best_metrics = {**validated.metrics, "model/images_per_s": validated.images_per_s}
        run.best_state = {k: v.detach().cpu().clone() for k, v in unwrap(run.model).state_dict().items()}
    metrics[f"best/{objective}"] = run.best if run.best is not None else math.nan
    last = epoch + 1 == run.cfg.train.epochs
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, began = None, time.perf_counter()
        if run.logger and checkpoint_due(run, epoch):
            checkpoint = save_state(run, folder, epoch + 1)
        elif run.logger and (improved or run.best_unlogged):  # the best weights still go to MLflow
            torch.save(run.best_state, os.path.join(folder, BEST_FILE))
        saving = time.perf_counter() - began
        if run.logger:
            # Before the report: a scheduler may stop the trial as soon as it has reported.
            run.logger.epoch(epoch + 1, metrics, best=(run.best_epoch, os.path.join(folder, BEST_FILE))
                             if improved or run.best_unlogged else None,
                             figures=(lambda: task_plots(run, validated)) if improved else None)
            run.best_unlogged = False
            run.logger.progress(epoch + 1, metrics, objective, trained.steps, trained.samples, run.world_size,
                                trained.seconds, time.perf_counter() - trained.started)
            if last and run.logger.client:  # before the last report: Tune may then stop the trial
                explain.log_best_views(run.logger.client, run.logger.run_id, run.task, run.cfg, unwrap(run.model),
                                       run.best_state, validated.view_rows, run.device,
                                       explain.decision_threshold(run.task, run.best_metrics))
            if last:  # the run's records all delivered before Tune may end it
                run.logger.finish()
        run.session.report({**shown_first(metrics, objective), **searched_at_best(run, metrics)}, checkpoint=checkpoint,
                           checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
        if checkpoint is not None:
            # Written here, then copied by the report into the run's storage: twice the write. (The
            # report's own time would count the other workers' arrival at it too.)
            run.checkpointed_at, run.checkpoint_cost = time.perf_counter(), 2 * saving
    if last and run.best is None:
        raise FloatingPointError(f"val/{objective} was not a number in any of the {run.cfg.train.epochs} epochs: "
                                 f"no best epoch to keep; check the task's outputs, or lower train.lr")


def searched_at_best(run: Run, metrics: dict) -> dict:
    """For Tune alone: the sweep's objectives and constrained metrics at the best epoch so far
    (``at_best/<metric>``; NaN before there is one). Not logged: MLflow has them at every epoch."""
    wanted = objectives.searched_metrics(run.cfg)
    if not wanted:
        return {}
    objectives.at_best_epoch(wanted, metrics, run.task.name)  # each one a metric the task logs
    best = {**run.best_metrics, "model/params": run.model_params}
    return {objectives.AT_BEST + m: float(best.get(m, math.nan)) for m in wanted}


def checkpoint_due(run: Run, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with a checkpoint (``train.checkpoint_every``): also
    each epoch population based training may exploit (a trial's weights taken by another)."""
    if run.cfg.tune.scheduler == "pbt" and (epoch + 1) % run.cfg.tune.perturbation_interval == 0:
        return True
    every = run.cfg.train.checkpoint_every
    if every != config_lib.AUTO:
        return (epoch + 1) % every == 0
    if run.checkpoint_cost is None:  # none written yet: its size at a slow disk's speed
        run.checkpoint_cost = checkpoint_bytes(run) / GUESSED_WRITE_BYTES_PER_S
    since = run.checkpointed_at if run.checkpointed_at is not None else run.training_since
    return time.perf_counter() - since >= CHECKPOINT_SPACING * run.checkpoint_cost


def checkpoint_bytes(run: Run) -> int:
    """The size of a checkpoint: the weights, the optimiser's state and the best weights."""
    def size(tree) -> int:
        if torch.is_tensor(tree):
            return tree.nbytes
        values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
        return sum(size(v) for v in values)

    return 2 * size(unwrap(run.model).state_dict()) + size(run.optimizer.state_dict())


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best``; NaN never does (nothing would ever beat it back)."""
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def task_plots(run: Run, validated: Validated) -> dict:
    """The task's figures of the epoch's model on its first val batch, on rank 0."""
    if not run.task.plots or validated.plot_batch is None:
        return {}
    model = unwrap(run.model)
    model.eval()
    return run.task.plots(model, to_device(validated.plot_batch, run.device), validated.outputs, run.cfg)


def shown_first(metrics: dict, objective: str) -> dict:
    """The metrics with the task's own first: Ray Tune's console table shows a trial's first four."""
    others = [k for k in metrics if k.startswith("val/") and k != f"val/{objective}"]
    first = [f"val/{objective}", f"best/{objective}", "train/loss", *others[:1]]
    return {**{k: metrics[k] for k in first if k in metrics}, **metrics}


# --- small helpers -------------------------------------------------------------------------------

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """The batch's tensors on ``device``; with ``channels_last`` its images (4-D floats) in that layout."""
    def moved(v):
        v = v.to(device, non_blocking=True)
        return v.contiguous(memory_format=torch.channels_last) if channels_last and v.ndim == 4 and v.is_floating_point() else v
    return {k: moved(v) if torch.is_tensor(v) else v for k, v in batch.items()}


def rows_in(numpy_batch: dict) -> int:
    return len(next(iter(numpy_batch.values())))


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
