"""What the tests share: running the platform's CLIs the way a user does."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _environment(env: dict | None) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", **(env or {})}


def _existing_store(args) -> None:
    """A new sqlite store named by ``mlflow.tracking_uri=`` starts as a copy of an empty one made once
    per session: MLflow's table migrations cost a command and each of its trials seconds on two
    cores. A store MLflow creates itself is what the commands run without that key see."""
    import shutil

    for arg in args:
        if arg.startswith("mlflow.tracking_uri=sqlite:///"):
            path = arg.split("sqlite:///", 1)[1]
            if not os.path.exists(path) and os.path.isdir(os.path.dirname(path) or "."):
                shutil.copyfile(_empty_store(), path)


@functools.cache
def _empty_store() -> str:
    from mlflow.tracking import MlflowClient

    path = os.path.join(tempfile.mkdtemp(prefix="empty-store-"), "mlflow.db")
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates every table
    MlflowClient(registry_uri=f"sqlite:///{path}").search_registered_models()
    return path


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a server a test starts."""
    from benchmarks.common import free_ports

    return free_ports(1)[0]


def run_cli(module: str, *args: str, cwd: str, env: dict | None = None, timeout: float = 540) -> subprocess.CompletedProcess:
    """``python -m <module> args...`` from ``cwd``, with the project root on PYTHONPATH as a user's shell would have it.

    A command still running after ``timeout`` seconds fails the test with the end of its output,
    before pytest-timeout's 600 s would fail it with only the test's own stack."""
    import pytest

    _existing_store(args)
    try:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=_environment(env),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        def text(part) -> str:  # what it had written so far: bytes, whatever the text mode
            return part.decode(errors="replace") if isinstance(part, bytes) else (part or "")

        pytest.fail(f"python -m {module} still running after {timeout:.0f}s; its output ended:\n"
                    f"{(text(expired.stdout) + text(expired.stderr))[-6000:]}")


def run_cli_here(module: str, *args: str, cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``run_cli`` inside this process: the command's own ``cli.run(main, argv)``, without the ~8 s
    a new interpreter spends importing torch, Ray and MLflow. For input the command must refuse
    before any work; a few of those run as real processes too (test_config.py), to show the whole
    stderr is the one line."""
    from platform import cli

    command = importlib.import_module(module if module != "platform.data" else "platform.data.__main__")
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)
    saved = {key: os.environ.get(key) for key in (env or {})}
    try:
        os.environ.update(env or {})
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.run(command.main, list(args))
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def start_cli(module: str, *args: str, cwd: str, env: dict | None = None) -> subprocess.Popen:
    """``run_cli`` in the background, stdout and stderr together: for a test that acts mid-run."""
    _existing_store(args)
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


def assert_figure(client, run_id: str, path: str) -> None:
    """``path`` on the run is a real figure: a PNG that decodes, of a readable size, not blank."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(client.download_artifacts(run_id, path, tempfile.mkdtemp()))  # (H, W, 4)
    assert image.shape[0] >= 200 and image.shape[1] >= 200, (path, image.shape)
    assert float(np.asarray(image)[..., :3].std()) > 0.05, f"{path} is blank"


def start_mlflow_server(store: str, artifacts: str, port: int | None = None, workers: int = 1):
    """A real ``mlflow server`` on loopback over the sqlite file ``store``: (its process, its URL), once it
    answers. Without MLflow's job runner, which the platform never uses."""
    import time
    import urllib.request

    port = port or free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", str(workers), "--backend-store-uri", f"sqlite:///{store}",
                               "--artifacts-destination", artifacts],
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"mlflow server on port {port} did not come up")


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server and the workers it started (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
