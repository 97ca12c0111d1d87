"""What the tests share: running the platform's CLIs the way a user does."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _environment(env: dict | None) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", **(env or {})}


def run_cli(module: str, *args: str, cwd: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m <module> args...`` from ``cwd``, with the project root on PYTHONPATH as a user's shell would have it."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_environment(env),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(module: str, *args: str, cwd: str, env: dict | None = None) -> subprocess.Popen:
    """``run_cli`` in the background, stdout and stderr together: for a test that acts mid-run."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=_environment(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# Tiny sizes: a real run of the real path, in seconds.
def tiny(cache: str, db: str, *extra: str) -> list[str]:
    return [
        f"data.cache_dir={cache}", "data.num_train=48", "data.num_val=30", "train.batch_size=16",
        f"mlflow.tracking_uri=sqlite:///{db}", *extra,
    ]


def overfit_losses(task, cfg, batch: dict, steps: int = 20, epoch: int = 0, lr: float = 1e-3) -> list[float]:
    """Training losses of a fresh model fitting one batch again and again: a task must drive them down."""
    import torch

    torch.manual_seed(0)
    model = task.build_model(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = task.train_step(model, {**batch, "epoch": epoch}, cfg)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if task.after_step:
            task.after_step(model, cfg)
        losses.append(loss.item())
    return losses
