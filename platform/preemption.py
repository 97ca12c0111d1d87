"""Spot preemption inside a run: notice it, checkpoint at the next step, resume at that step.

Two warnings say a worker is about to go:

- Ray's drain notice for its node (the autoscaler, or ``ray drain-node --reason PREEMPTION``), read
  with ``ray.train.get_preemption_info()``. The worker checkpoints and keeps training until the node
  goes; Ray Train then restarts the group from that checkpoint, counted against
  ``train.max_preemptions`` rather than ``train.max_failures``.
- SIGTERM to the worker's process (a spot VM shutting down, a pod evicted). The worker checkpoints,
  then ends with :class:`Preempted`; Ray Train restarts the group from that checkpoint, counted
  against ``train.max_failures``. A second SIGTERM ends the process at once, as Ray's own handler does.

Checkpointing is collective (every rank must reach the report), so the ranks agree on it every
``train.preemption_check_steps`` steps and at no other time: between checks nothing is synchronised.
"""

from __future__ import annotations

import signal
import threading

import ray
import torch
import torch.distributed as dist

_sigterm = threading.Event()
_previous_handler = None


class Preempted(RuntimeError):
    """This worker was asked to stop (SIGTERM) and its checkpoint is saved: Ray Train restarts from it."""


def _on_sigterm(signum, frame) -> None:
    _sigterm.set()
    # The next SIGTERM is not a warning any more: Ray's handler ends the process.
    signal.signal(signal.SIGTERM, _previous_handler or signal.SIG_DFL)


def _catch_sigterm() -> None:
    global _previous_handler
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous_handler = current
    _sigterm.clear()
    signal.signal(signal.SIGTERM, _on_sigterm)


def catch_sigterm() -> str | None:
    """Turn SIGTERM into a warning this worker reads at its next check; None, or why it could not.

    Handlers can only be set on a process's main thread, and Ray Train runs the loop on another: the
    worker actor's main thread runs the actor's tasks, so the handler is set by one of them.
    """
    if threading.current_thread() is threading.main_thread():
        _catch_sigterm()
        return None
    try:
        worker = ray.get_runtime_context().current_actor
        ray.get(worker.execute.remote(_catch_sigterm), timeout=60)
    except Exception as error:  # a Ray without RayTrainWorker.execute: SIGTERM ends the worker, as before
        return f"{type(error).__name__}: {error}"
    return None


def warning(world_size: int, device: torch.device) -> str | None:
    """Whether any rank was warned, the same answer on every rank: "SIGTERM", "drain" or None.

    Collective: every rank must call it at the same step.
    """
    drain = ray.train.get_preemption_info()  # one value for all ranks, from Ray's watcher
    flag = torch.tensor([1.0 if _sigterm.is_set() else 0.0], device=device)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        return "SIGTERM"
    return "drain" if drain is not None else None


def sigterm_received() -> bool:
    """This process's own SIGTERM (not another rank's): it is the one that must stop."""
    return _sigterm.is_set()
