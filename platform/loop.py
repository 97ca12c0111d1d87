"""The one per-worker training loop, for every task, one CPU worker or many GPUs.

It owns what a task should not care about: devices, DDP, mixed precision, clipping,
the learning-rate schedule, checkpoint and resume, gathering evaluation outputs over
workers, reporting to Ray and logging to MLflow (rank 0 only). The task supplies
``build_model``, ``collate``, ``train_step``, ``eval_step``, ``evaluate`` and ``plots``.
It runs on Ray Train's workers, or (``scaling.num_workers=0``) in the run's own process: the
``Session`` says which, and where its reports and checkpoints go.

Host syncs are kept to one per epoch (the running loss is summed on the device), plus one every
``train.preemption_check_steps`` steps, where the ranks agree whether to checkpoint early.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from platform import config as config_lib
from platform import preemption, pretrained, registry, tracking

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"
PREEMPTION_KEY = "preemption"  # in a report that only carries a checkpoint taken on a preemption warning


def say(line: str) -> None:
    # Not print(): Ray Train patches it to log and also echo to a wrapped stdout, so each
    # line would reach the driver twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def build_optimizer(model: torch.nn.Module, train) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales, as usual for AdamW on CNNs and ViTs.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def gather_outputs(chunks: list[dict], world_size: int) -> dict[str, np.ndarray]:
    """Concatenate per-batch eval outputs, then over workers (every worker gets everything)."""
    local = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
    if world_size == 1:
        return local
    everyone = [None] * world_size
    dist.all_gather_object(everyone, local)
    keys = next(d for d in everyone if d).keys()
    return {k: np.concatenate([d[k] for d in everyone if d]) for k in keys}


def evaluate(model, task, cfg, device, dtype, world_size, val_batches,
             view_rows: int = 0) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Gathered eval outputs of the whole val split, this worker's first collated val batch, and
    ``view_rows`` of its val rows as read (one numpy batch), chosen by ``explain.ViewRows``."""
    from platform.explain import ViewRows

    model.eval()
    chunks, first_batch = [], None
    views = ViewRows(view_rows, len(cfg.data.classes))
    with torch.no_grad(), _autocast(device, dtype):
        for numpy_batch in val_batches:
            if view_rows and not views.full:
                views.add(numpy_batch)
            batch = task.collate(numpy_batch, cfg, False)
            first_batch = first_batch or batch
            out = task.eval_step(model, to_device(batch, device), cfg)
            chunks.append({k: v.detach().float().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
                           for k, v in out.items()})
    return gather_outputs(chunks, world_size), first_batch, views.rows()


def shard_batches(split: str, loop_config: dict, cfg, session: Session):
    """``batches(shuffle_seed, skip=0)``: one epoch of numpy batches of this worker's share of
    ``split``, from batch ``skip`` on.

    A split held in the object store (``train.put_in_memory``) is sliced here, every
    ``world_size``-th row from ``rank`` on, equal shares as DDP needs (zero-copy views of the
    node's one shared copy), and served in a fresh seeded permutation each epoch: a run resumed
    mid-epoch skips exactly the batches it trained. Any other split streams from its Ray Data
    shard every epoch, shuffled in a local buffer. ``shuffle_seed=None``: in order (evaluation).
    """
    batch_size = cfg.train.batch_size
    ref = loop_config["in_memory"].get(split)
    if ref is None:
        shard = session.dataset_shard(split)

        def streamed(shuffle_seed: int | None, skip: int = 0):
            shuffle = {} if shuffle_seed is None else {"local_shuffle_seed": shuffle_seed, "local_shuffle_buffer_size":
                                                       min(loop_config["train_rows"], 4 * batch_size)}
            return itertools.islice(shard.iter_batches(batch_size=batch_size, batch_format="numpy", **shuffle), skip, None)

        return streamed
    rank, world_size = session.rank, session.world_size
    rows = ray.get(ref)
    share = len(rows["image"]) // world_size
    rows = {k: v[rank:share * world_size:world_size] for k, v in rows.items()}

    def from_memory(shuffle_seed: int | None, skip: int = 0):
        order = np.random.default_rng(shuffle_seed).permutation(share) if shuffle_seed is not None else np.arange(share)
        for start in range(skip * batch_size, share, batch_size):
            picked = order[start:start + batch_size]
            yield {k: v[picked] for k, v in rows.items()}  # a copy: the shared rows are read-only

    return from_memory


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


def ray_train_session() -> Session:
    """Inside a Ray Train worker (or Ray Train's local mode, for ``platform.train``)."""
    context = ray.train.get_context()
    return Session(
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=ray.train.torch.get_device(),
        report=ray.train.report, get_checkpoint=ray.train.get_checkpoint,
        checkpoint_from=ray.train.Checkpoint.from_directory, dataset_shard=ray.train.get_dataset_shard,
        prepare_model=lambda model, ddp: ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp))


def tune_trial_session(cfg, datasets: dict) -> Session:
    """Inside a Tune trial's own process: Ray forbids Ray Train's calls there, and has no use for
    them: one process, no DDP. Tune stores the checkpoints and restarts the trial from them."""
    from ray import tune

    # Ray gave the trial its GPU (CUDA_VISIBLE_DEVICES): the first one visible is it.
    device = torch.device("cuda", 0) if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    return Session(
        rank=0, world_size=1, device=device,
        report=lambda metrics, checkpoint=None, checkpoint_dir_name=None: tune.report(metrics, checkpoint=checkpoint),
        get_checkpoint=tune.get_checkpoint, checkpoint_from=tune.Checkpoint.from_directory,
        dataset_shard=datasets.__getitem__, prepare_model=lambda model, ddp: model.to(device))


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point, on each worker."""
    run_loop(loop_config, ray_train_session())


def run_loop(loop_config: dict, session: Session) -> None:
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = config_lib.from_dict(loop_config["cfg"])
    task = registry.get(cfg.task)
    rank, world_size, device = session.rank, session.world_size, session.device
    report, get_checkpoint = session.report, session.get_checkpoint
    in_process = cfg.scaling.num_workers == 0
    if in_process:  # a Ray Train worker gets these threads from its resources; this process trains itself
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    run_id, client = loop_config.get("mlflow_run_id"), None
    if rank == 0 and run_id:
        client = tracking.MlflowClient(loop_config["tracking_uri"])

    # Where each rank runs, by rank (Ray node ids): on the MLflow run, to see a run spread over nodes.
    where = [(ray.get_runtime_context().get_node_id(), os.getpid())]
    if world_size > 1:
        where = [None] * world_size
        dist.all_gather_object(where, (ray.get_runtime_context().get_node_id(), os.getpid()))
    if client:
        tracking.set_tags(client, run_id, {"platform.worker_nodes": ",".join(n for n, _ in where),
                                            "platform.worker_pids": ",".join(str(p) for _, p in where)})

    torch.manual_seed(cfg.train.seed)  # same init everywhere; DDP broadcasts rank 0's anyway
    np.random.seed(cfg.train.seed + rank)
    model = task.build_model(cfg)
    if not get_checkpoint():  # a resumed run has its own weights already
        new = pretrained.initialise(model, task, cfg, loop_config["tracking_uri"])
        if new is not None and rank == 0:
            say(f"[{cfg.task}] initialised from {cfg.init_from}; {len(new)} tensors not in it: "
                f"{', '.join(new[:6])}{' ...' if len(new) > 6 else ''}")
    # A task that leaves some parameters without gradients in some steps (a frozen warm-up)
    # needs DDP to look for them; it costs a graph traversal per step, so only on request.
    ddp_options = {"find_unused_parameters": True} if task.find_unused_parameters else None
    model = session.prepare_model(model, ddp_options)
    optimizer = build_optimizer(model, cfg.train)
    dtype = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    steps_per_epoch = max(1, math.ceil(loop_config["train_rows"] / world_size / cfg.train.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg.train))
    objective = task.objective(cfg)
    metric_key = f"val/{objective}"

    start_epoch, best, best_epoch, best_state = 0, None, 0, None
    skip_steps, partial = 0, None  # a checkpoint taken mid-epoch (a preemption) resumes at its step
    logged_epochs: set[int] = set()  # epochs already on the MLflow run, from before a restart
    checkpoint = get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location=device, weights_only=True)
            best_state = torch.load(os.path.join(folder, BEST_FILE), map_location="cpu", weights_only=True)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]
        skip_steps, partial = state.get("step", 0), state.get("partial")
        if rank == 0:
            where = f" step {skip_steps}" if skip_steps else ""
            shown = f" (best {metric_key}={best:.4f})" if best is not None else ""
            say(f"[{cfg.task}] resuming from epoch {start_epoch}{where}{shown}")
    if client:
        # A worker (or a trial) lost after logging an epoch but before its checkpoint trains that
        # epoch again, from the last checkpoint or, before the first one, from scratch: its steps
        # stay logged once, as the first attempt logged them.
        logged_epochs = {m.step for m in client.get_metric_history(run_id, "epoch")}

    # A spot VM's SIGTERM becomes a warning read at the next check, not the end of the process.
    # In-process runs have no worker to restart: Tune restarts the trial from its last epoch.
    check_every = 0 if in_process else cfg.train.preemption_check_steps
    if check_every and (why := preemption.catch_sigterm()):
        say(f"[{cfg.task}] rank {rank}: SIGTERM will end this worker without a checkpoint ({why})")
    saved_for_drain = False

    def save_state(folder: str, epoch: int, step: int = 0, partial_sums: dict | None = None):
        """Rank 0's checkpoint: ``epoch`` epochs done, and ``step`` steps into the next when mid-epoch."""
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "epoch": epoch, "step": step, "partial": partial_sums, "best": best, "best_epoch": best_epoch}
        torch.save(state, os.path.join(folder, STATE_FILE))
        torch.save(best_state, os.path.join(folder, BEST_FILE))
        return session.checkpoint_from(folder)

    train_batches = shard_batches("train", loop_config, cfg, session)
    val_batches = shard_batches("val", loop_config, cfg, session)
    deadline = loop_config.get("deadline")  # an in-process trial's tune.trial_timeout_s
    first_step_at = None  # wall clock when a fresh run's first batch is in hand
    epoch_times: list[float] = []  # this process's epochs, evaluation and logging included: the ETA
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        started, loss_sum, samples = time.perf_counter(), torch.zeros((), device=device), 0
        seconds_before = 0.0  # this epoch's training time before a preemption, when resumed mid-epoch
        if partial and epoch == start_epoch:
            seconds_before = partial["seconds"]
            if rank == 0:  # the sums over every rank up to the preemption, counted once
                loss_sum += partial["loss_sum"]
                samples = int(partial["samples"])
        steps = skip_steps if epoch == start_epoch else 0  # the batches trained before a preemption
        for numpy_batch in train_batches(cfg.train.seed * 1000 + epoch * 10 + rank, steps):
            if deadline and time.time() > deadline:
                raise TimeoutError(f"the trial ran past tune.trial_timeout_s={cfg.tune.trial_timeout_s:g} and was stopped")
            if first_step_at is None and epoch == 0 and not skip_steps:
                first_step_at = time.time()
            batch = to_device(task.collate(numpy_batch, cfg, True), device)
            batch["epoch"] = epoch  # 0-based, for schedules inside a task's loss
            with _autocast(device, dtype):
                loss = task.train_step(model, batch, cfg)["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if task.after_step:
                task.after_step(unwrap(model), cfg)
            loss_sum += loss.detach().float()
            samples += len(numpy_batch["image"])
            steps += 1

            if check_every and steps % check_every == 0:
                warned = preemption.warning(world_size, device)
                if warned == "SIGTERM" or (warned == "drain" and not saved_for_drain):
                    sums = torch.stack([loss_sum, torch.tensor(float(samples), device=device)])
                    if world_size > 1:
                        dist.all_reduce(sums)
                    partial_sums = {"loss_sum": sums[0].item(), "samples": sums[1].item(),
                                    "seconds": seconds_before + time.perf_counter() - started}
                    with tempfile.TemporaryDirectory() as folder:
                        saved = save_state(folder, epoch, steps, partial_sums) if rank == 0 else None
                        # Not an epoch's result: platform.tune does not pass it on to Tune.
                        report({PREEMPTION_KEY: f"{warned} in epoch {epoch + 1} at step {steps}"},
                               checkpoint=saved, checkpoint_dir_name=f"epoch-{epoch:04d}-step-{steps:06d}")
                    if rank == 0:
                        say(f"[{cfg.task}] preemption warning ({warned}): checkpoint saved in epoch "
                            f"{epoch + 1} at step {steps}")
                    saved_for_drain = saved_for_drain or warned == "drain"
                    if warned == "SIGTERM" and preemption.sigterm_received():
                        raise preemption.Preempted(
                            f"rank {rank} received SIGTERM; its run's checkpoint from epoch {epoch + 1} step "
                            f"{steps} is saved and Ray Train restarts from it (train.max_failures)")
        epoch_time = seconds_before + time.perf_counter() - started

        totals = torch.stack([loss_sum, torch.tensor(float(steps), device=device), torch.tensor(float(samples), device=device)])
        if world_size > 1:
            dist.all_reduce(totals)
        train_loss = (totals[0] / totals[1].clamp(min=1)).item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"train/loss became {train_loss} in epoch {epoch + 1}; lower train.lr or enable train.grad_clip")

        last = epoch + 1 == cfg.train.epochs
        outputs, plot_batch, view_rows = evaluate(model, task, cfg, device, dtype, world_size, val_batches(None),
                                                  view_rows=cfg.plots.samples if last and rank == 0 else 0)
        metrics = {f"val/{k}": float(v) for k, v in task.evaluate(outputs, cfg).items()}
        metrics.update({
            "train/loss": train_loss,
            "train/lr": scheduler.get_last_lr()[0],
            "train/samples_per_s": totals[2].item() / epoch_time,
            "epoch": epoch + 1,
        })
        if epoch == 0 and first_step_at is not None and "started_at" in loop_config:
            # Start-up: the trainer built on the driver -> workers, data pipeline, model -> first batch.
            metrics["time/to_first_step_s"] = first_step_at - loop_config["started_at"]
        improved = is_better(metrics[metric_key], best, task.mode)
        if improved:
            best, best_epoch = metrics[metric_key], epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
        metrics[f"best/{objective}"] = best

        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                checkpoint = save_state(folder, epoch + 1)
                if client and epoch + 1 not in logged_epochs:
                    # Before the report: a scheduler may stop the trial as soon as it has reported.
                    tracking.log_metrics(client, run_id, metrics, step=epoch + 1)
                    if improved:
                        log_best(client, run_id, task, cfg, model, plot_batch, outputs, device, best_epoch, folder)
                epoch_times.append(time.perf_counter() - started)
                eta = (cfg.train.epochs - epoch - 1) * float(np.median(epoch_times))
                say(f"[{cfg.task}] epoch {epoch + 1}/{cfg.train.epochs}  {steps / max(epoch_time, 1e-9):.1f} steps/s  "
                    f"train/loss {train_loss:.4f}  {metric_key} {metrics[metric_key]:.4f} "
                    f"(best {best:.4f})  {int(totals[2].item())} samples on {world_size} "
                    f"worker{'s' if world_size > 1 else ''} in {epoch_time:.1f}s  ETA {format_duration(eta)}")
                if client and last:  # before the last report: Tune may then stop the trial
                    log_model_views(client, run_id, task, cfg, model, best_state, view_rows, device)
            report(shown_first(metrics, objective), checkpoint=checkpoint, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")


def shown_first(metrics: dict, objective: str) -> dict:
    """The metrics with the task's own first: Ray Tune's console table shows a trial's first four."""
    others = [k for k in metrics if k.startswith("val/") and k != f"val/{objective}"]
    first = [f"val/{objective}", f"best/{objective}", "train/loss", *others[:1]]
    return {**{k: metrics[k] for k in first if k in metrics}, **metrics}


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def log_model_views(client, run_id, task, cfg, model, best_state, rows: dict, device) -> None:
    """Grad-CAM and the embedding map of the run's best weights (``platform.explain``) over ``rows``
    (this worker's first validation rows), once, at the run's end."""
    from platform import explain

    if not explain.wanted(task, cfg) or best_state is None:
        return

    def best_model():
        best = copy.deepcopy(unwrap(model))
        best.load_state_dict(best_state)
        return best

    started = time.perf_counter()
    figures, why = explain.log_views(client, run_id, best_model, task, cfg, rows, device)
    if why:
        say(f"[{cfg.task}] warning: Grad-CAM / embedding figures failed ({why}); the run goes on")
    elif figures:
        say(f"[{cfg.task}] {', '.join(figures)} of the best epoch logged in {time.perf_counter() - started:.1f}s")


def log_best(client, run_id, task, cfg, model, batch, outputs, device, best_epoch, folder) -> None:
    """The best epoch so far on the MLflow run: its weights and the task's plots."""
    tracking.log_file(client, run_id, os.path.join(folder, BEST_FILE), "checkpoints")
    tracking.set_tags(client, run_id, {"platform.best_epoch": best_epoch})
    if task.plots and batch is not None:
        model = unwrap(model)
        model.eval()
        tracking.log_figures(client, run_id, task.plots(model, to_device(batch, device), outputs, cfg))
