"""MLflow: one run per training run, a parent run per sweep, trials nested under it.

Everything goes through ``MlflowClient`` with explicit run ids, never MLflow's global
"active run": runs are created by the driver (or the Tune trial function) and written
by rank 0 of the Train workers, in other processes and on other machines.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from platform import cost
from platform.masking import is_secret, redact

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
TRIAL_TAG = "platform.trial_id"
SWEEP_TAG = "platform.sweep"
TASK_TAG = "platform.task"
KIND_TAG = "platform.kind"  # "sweep" or "comparison" on a parent run
SPACE_TAG = "platform.space"  # a sweep's search space (JSON), on its parent run
SEARCHED_TAG = "platform.searched"  # the keys a trial sampled (a conditional space's differ), on its run
STOPPED_TAG = "platform.stopped_early"  # "true" on a trial the scheduler stopped before its last epoch
FAILURE_TAG = "platform.failure"  # why a trial failed, in one line
VIEWS_TAG = "platform.views"  # the Grad-CAM / embedding figures a run drew at its end ("none": its task has none)
_MAX_PARAM_VALUE = 6000


# The stores MLflow's client can write to (a `+driver` suffix is allowed: postgresql+psycopg2).
# No file: MLflow 3's file store refuses to start unless opted in.
STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def tracking_uri(configured: str) -> str:
    """Absolute tracking URI (Ray workers run in other directories than the driver), its store checked now.

    A database or server that does not answer, or refuses the credentials, is one line here: MLflow
    itself would retry a database for most of an hour and a server for minutes, then raise a traceback.
    """
    from platform.config import ConfigError, output_dir

    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(output_dir(), 'mlflow.db')}"
    source = "mlflow.tracking_uri" if configured else "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else ""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in STORE_SCHEMES:
        raise ConfigError(f"{source or 'mlflow.tracking_uri'}={redact(uri)} is not an MLflow store; expected "
                          f"sqlite:///path/mlflow.db, http://host:port or another of {', '.join(STORE_SCHEMES)}")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    elif scheme in _DEFAULT_PORTS and uri not in _ANSWERED:
        _check_store_answers(uri, scheme, f"{source or 'mlflow.tracking_uri'}={redact(uri)}")
        _ANSWERED.add(uri)
    return uri


# The stores reached over the network, by their default port; and those this process has reached
# (train and tune resolve their URI twice).
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
_ANSWERED: set[str] = set()
_DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


def _check_store_answers(uri: str, scheme: str, shown: str) -> None:
    """A one-line ConfigError (``shown``: the setting, password masked) unless the store's driver is
    installed, its host:port answers, and it takes the credentials it is given."""
    import socket
    from urllib.parse import urlsplit

    from platform.config import ConfigError

    engine = None
    if scheme not in ("http", "https"):
        import sqlalchemy

        try:  # imports the database's Python driver, connects to nothing
            engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        except (ImportError, sqlalchemy.exc.ArgumentError) as error:
            missing = getattr(error, "name", None)
            fix = (f"pip install {_DRIVER_PACKAGES.get(missing, missing)}" if missing else
                   "name an installed driver (postgresql+psycopg://, mysql+pymysql://, ...)")
            raise ConfigError(f"{shown}: no Python driver for it here ({_one_line(error)}); {fix}") from None
    try:
        address = urlsplit(uri)
        host, port = address.hostname, address.port or _DEFAULT_PORTS[scheme]
    except ValueError as error:  # a port that is not a number
        raise ConfigError(f"{shown}: {_one_line(error)}; expected {scheme}://host:port/...") from None
    if host:  # else a database on a local socket: the connection below says
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as error:
            raise ConfigError(f"{shown}: nothing answers at {host}:{port} ({_one_line(error) or 'timed out'}); start "
                              f"the {'tracking server' if engine is None else 'database'} or correct the address") from None
    if engine is not None:
        try:
            engine.connect().close()
        except Exception as error:  # the driver's own error: a wrong password, no such database
            raise ConfigError(f"{shown}: the database refuses the connection "
                              f"({_one_line(getattr(error, 'orig', None) or error)})") from None
        finally:
            engine.dispose()
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:  # with the credentials MLflow itself will send: MLFLOW_TRACKING_USERNAME/PASSWORD, ~/.mlflow/credentials
        status = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                              max_retries=0, timeout=10, params={"max_results": 1}).status_code
    except Exception as error:
        raise ConfigError(f"{shown}: the tracking server does not answer ({_one_line(error)})") from None
    if status in (401, 403):
        raise ConfigError(f"{shown}: the tracking server refuses these credentials (HTTP {status}); set "
                          f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to a "
                          f"user of that server")


def _one_line(error: BaseException) -> str:
    return redact(" ".join(str(error).split()))


def store_exists(uri: str) -> bool:
    """False for a sqlite store whose file is not there yet: reading it would create it."""
    return not uri.startswith("sqlite:///") or os.path.exists(uri[len("sqlite:///"):])


# MLflow 3's UI opens in its GenAI mode (traces, judges) unless told otherwise: the tag marks an
# experiment as model training, and a link with UI_MODE opens the training-runs view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_MODE = "?workflowType=machine_learning"


def ui_base(uri: str) -> str | None:
    """Where the MLflow UI of a tracking URI is: the server itself (without its credentials:
    https://user:token@host), 127.0.0.1:5000 for a local store (``mlflow ui``), else None."""
    if uri.startswith(("http://", "https://")):
        return re.sub(r"//[^/@]*@", "//", uri)
    return "http://127.0.0.1:5000" if uri.startswith(("sqlite:", "file:", "/")) else None


def ui_link(base_url: str, experiment: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment's runs, or of one run, in its model-training mode."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment}" + (f"/runs/{run_id}" if run_id else "") + UI_MODE


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    except Exception:  # another process created it between our two calls
        return client.get_experiment_by_name(name).experiment_id


def start_run(client: MlflowClient, experiment: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
    tags = {**tags, RUN_NAME_TAG: name}
    if parent:
        tags[PARENT_TAG] = parent
    return client.create_run(experiment, run_name=name, tags=tags).info.run_id


def public_params(flat: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params: nothing whose key looks like a secret, no password in a URI."""
    return {k: str(redact(v))[:_MAX_PARAM_VALUE] for k, v in flat.items() if not is_secret(k)}


def log_params(client: MlflowClient, run_id: str, flat: dict[str, Any]) -> None:
    params = [Param(k, v) for k, v in public_params(flat).items()]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_figures(client: MlflowClient, run_id: str, figures: dict, folder: str = "plots") -> None:
    from platform.plots import pyplot

    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"{folder}/{name}")
        pyplot().close(figure)


def log_file(client: MlflowClient, run_id: str, path: str, folder: str) -> None:
    client.log_artifact(run_id, path, folder)


def end_run(client: MlflowClient, run_id: str, status: str, only_if_running: bool = False,
            end_time: int | None = None) -> None:
    if only_if_running and client.get_run(run_id).info.status != "RUNNING":
        return
    client.set_terminated(run_id, status, end_time=end_time)


def model_signature(model, input_example):
    """Inputs typed from the example; outputs too when the model returns one tensor.

    MLflow would otherwise infer the signature by calling the model, fail on a model that
    returns a tuple (the MAE's loss, reconstruction and mask), and replay the example as
    float64 JSON against float32 weights.
    """
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = np.asarray(input_example)
    inputs = Schema([TensorSpec(example.dtype, (-1, *example.shape[1:]))])  # any batch size
    with torch.no_grad():
        output = model(torch.as_tensor(example))
    if not isinstance(output, torch.Tensor):
        return ModelSignature(inputs), False
    output = output.numpy()
    return ModelSignature(inputs, Schema([TensorSpec(output.dtype, (-1, *output.shape[1:]))])), True


def log_model(client: MlflowClient, run_id: str, model, cfg, input_example, register_as: str | None) -> str | None:
    """Log a torch model of ``cfg`` on ``run_id`` as an MLflow pyfunc model of the platform's own format
    (``platform.model_files``: safetensors weights and the config, no pickle); register it if asked.
    Returns the version."""
    import warnings

    import mlflow
    import mlflow.pyfunc

    from platform import model_files

    model = model.cpu().eval()
    signature, servable = model_signature(model, input_example)
    with (using_uri(client._tracking_client.tracking_uri), mlflow.start_run(run_id=run_id, nested=True),
          tempfile.TemporaryDirectory(prefix="deeplense-model-") as folder, warnings.catch_warnings()):
        # Left out on purpose for a model that returns several tensors (below): not worth a warning.
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            # Rebuilt by the platform's own module from the weights and the config: nothing in the
            # folder is unpickled, so a model from a shared registry cannot carry code.
            loader_module=model_files.LOADER,
            data_path=model_files.save(model, cfg, folder),
            signature=signature,
            # MLflow checks the example by serving it: only for a model that returns one tensor.
            input_example=input_example if servable else None,
            # Inferring requirements imports and inspects the whole environment: slow, and known here.
            pip_requirements=["torch", "timm", "numpy", "safetensors", "omegaconf", "pyyaml"],
            metadata={"platform.task": cfg.task},
        )
    if not register_as:
        return None
    from platform import console

    with using_uri(client._tracking_client.tracking_uri), console.hushed():  # the summary says which version
        return mlflow.register_model(info.model_uri, register_as).version


@contextlib.contextmanager
def using_uri(uri: str):
    """MLflow's fluent API pointed at ``uri`` for a moment, then put back exactly as it was.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI to the environment, where
    every later subprocess (a Ray worker, the next command) would inherit it.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_text(client: MlflowClient, run_id: str, text: str, name: str) -> None:
    client.log_text(run_id, text, name)


@contextlib.contextmanager
def downloaded(client: MlflowClient, run_id: str, path: str):
    """A run's artifact in a temporary folder for the ``with`` block; the folder goes after it."""
    with tempfile.TemporaryDirectory(prefix="deeplense-") as folder:
        yield client.download_artifacts(run_id, path, folder)


def say(line: str) -> None:
    """A line on the run's console. Not print(): Ray Train patches it to log and also echo to a
    wrapped stdout, so each line would reach the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class TrackingServerAwayError(ConnectionError):
    """The tracking server did not answer for longer than ``mlflow.outage_limit_s``."""


class PatientClient:
    """An MlflowClient for a run's writes that never holds training up while the tracking server is away.

    A write the server does not take (it is restarting, its host rebooting) is kept, in order: its
    file copied, its figure already drawn to a PNG; the kept writes go first at the next write, so
    the epochs go on meanwhile. ``deliver(wait=True)`` waits for the server (a run's end); a server
    away longer than ``limit_s`` fails the run with that reason. Reads are the client's own.
    """

    def __init__(self, client: MlflowClient, limit_s: float):
        self._client, self.limit_s = client, limit_s
        self._waiting: list[tuple[str, tuple]] = []  # (client method, its arguments), oldest first
        self._away_since: float | None = None
        self._folder: str | None = None  # files kept for a later delivery: made when one is kept, gone once sent

    def __getattr__(self, name):  # reads, and anything not a write
        return getattr(self._client, name)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._send("log_batch", run_id, list(metrics), list(params), list(tags))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._send("log_text", run_id, text, artifact_file)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._send("log_artifact", run_id, local_path, artifact_path)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        folder = tempfile.mkdtemp(dir=self._outbox())  # drawn now: the caller closes the figure
        path = os.path.join(folder, os.path.basename(artifact_file))
        figure.savefig(path)
        self._send("log_artifact", run_id, path, os.path.dirname(artifact_file) or None)

    def _send(self, method: str, *args) -> None:
        self._waiting.append((method, args))
        self.deliver()

    def deliver(self, wait: bool = False) -> None:
        """Send the kept writes, oldest first; with ``wait``, until the server takes them all."""
        while self._waiting:
            method, args = self._waiting[0]
            try:
                with _failing_fast():
                    getattr(self._client, method)(*args)
            except Exception as error:
                if not _server_away(error):
                    raise
                self._keep_files()
                self._note_away(error)
                if not wait:
                    return
                time.sleep(2)
                continue
            self._waiting.pop(0)
            if method == "log_artifact" and self._holds(args[1]):
                shutil.rmtree(os.path.dirname(args[1]), ignore_errors=True)  # the outbox's own copy, delivered
            if self._away_since is not None and not self._waiting:
                say(f"the tracking server is back after {time.time() - self._away_since:.0f}s; the records kept "
                    f"meanwhile are delivered")
                self._away_since = None
        self.close()  # all sent: no outbox left behind by a run that never calls close (a trial Tune stops)

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _outbox(self) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="deeplense-outbox-")
        return self._folder

    def _holds(self, path: str) -> bool:
        return self._folder is not None and path.startswith(self._folder)

    def _keep_files(self) -> None:
        """Copies of the files waiting to be logged that are not the outbox's own: their folders may go."""
        for i, (method, args) in enumerate(self._waiting):
            if method == "log_artifact" and not self._holds(args[1]):
                copy = os.path.join(tempfile.mkdtemp(dir=self._outbox()), os.path.basename(args[1]))
                shutil.copyfile(args[1], copy)
                self._waiting[i] = (method, (args[0], copy, *args[2:]))

    def _note_away(self, error: Exception) -> None:
        now = time.time()
        if self._away_since is None:
            self._away_since = now
            say(f"the tracking server does not answer ({_one_line(error)[:200]}); training goes on and its records "
                f"are kept until it is back (at most mlflow.outage_limit_s={self.limit_s:g}s)")
        if now - self._away_since > self.limit_s:
            self.close()  # the kept files go with the records they belonged to
            raise TrackingServerAwayError(
                f"the tracking server {ui_base(self._client.tracking_uri) or ''} has not answered for "
                f"{now - self._away_since:.0f}s (mlflow.outage_limit_s={self.limit_s:g}); {len(self._waiting)} "
                f"records of this run are lost; once it is back, resume with the same command") from None


@contextlib.contextmanager
def _failing_fast():
    """MLflow's own retries off for a moment: they would hold a write (and training) for minutes
    while the server is away; PatientClient keeps the write and tries again itself. MLflow reads
    these at each request."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"})
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _server_away(error: BaseException) -> bool:
    """Whether a failed write means the server is not answering (rather than refusing the write)."""
    text = str(error)
    return any(sign in text for sign in ("Max retries exceeded", "Connection refused", "Connection aborted",
                                          "RemoteDisconnected", "Read timed out", "error code 502",
                                          "error code 503", "error code 504")) or isinstance(error, ConnectionError)


def watch_system(run_id: str, uri: str, interval_s: float):
    """MLflow's system metrics of this process's machine on the run, sampled every ``interval_s`` s in a
    thread (``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``, ...,
    ``system/gpu_0_utilization_percentage`` for the first GPU the run was given). The monitor (call
    ``stop_watching``), or None when off or when MLflow cannot sample here."""
    if not interval_s:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    except Exception as error:  # a store that cannot say the run's last step: the run goes on without
        say(f"warning: no system metrics for run {run_id} ({_one_line(error)})")
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    for gpus in (m for m in monitor.monitors if hasattr(m, "gpu_handles") and visible is not None):
        import pynvml  # NVML sees every GPU of the machine; the run has these ones

        ids = [(i, pynvml.nvmlDeviceGetUUID(h)) for i, h in enumerate(gpus.gpu_handles)]
        gpus.gpu_handles = [gpus.gpu_handles[i] for i in given_gpus(ids, visible)]
        gpus.num_gpus = len(gpus.gpu_handles)
    monitor.start()
    return monitor


def stop_watching(monitor, wait_s: float = 10.0) -> None:
    """The system metrics' last samples delivered, waiting at most ``wait_s``: a tracking server that
    is away keeps MLflow's client retrying for minutes, and a run must not wait on its monitor."""
    import threading

    finishing = threading.Thread(target=monitor.finish, name="SystemMetricsFinish", daemon=True)
    finishing.start()
    finishing.join(wait_s)


def given_gpus(ids: list[tuple[int, str]], visible: str) -> list[int]:
    """Positions in ``ids`` ((NVML index, UUID) of every GPU of the machine) of the GPUs that
    CUDA_VISIBLE_DEVICES ``visible`` names (indices or UUIDs), in its order: CUDA's device 0 first."""
    found = []
    for name in (v.strip() for v in visible.split(",")):
        match = next((position for position, (index, uuid) in enumerate(ids)
                      if name in (str(index), uuid) or (name.startswith("GPU-") and uuid.startswith(name))), None)
        if match is None:
            break  # CUDA stops at the first name it cannot use
        found.append(match)
    return found


class EpochLogger:
    """Rank 0's record of a run, epoch by epoch: its MLflow run (when it has one) and its console line.

    A worker (or trial) lost after logging an epoch but before that epoch's checkpoint trains it
    again: its steps stay logged once, as the first attempt logged them. Its writes wait for a
    tracking server that is away (``PatientClient``); ``finish`` delivers them before the run ends.
    """

    def __init__(self, task: str, epochs: int, client: MlflowClient | None = None, run_id: str | None = None,
                 outage_limit_s: float = 600.0):
        self.task, self.epochs, self.run_id = task, epochs, run_id
        self.client = PatientClient(client, outage_limit_s) if client else None
        self.logged = {m.step for m in client.get_metric_history(run_id, "epoch")} if client else set()
        earlier = client.get_run(run_id).data if client else None  # an earlier attempt's, if any
        self.earlier_metrics, self.earlier_tags = (earlier.metrics, earlier.tags) if earlier else ({}, {})
        self.epoch_seconds: list[float] = []  # this process's epochs, evaluation and logging included: the ETA

    def say(self, line: str) -> None:
        say(f"[{self.task}] {line}")

    def placement(self, where: list[tuple[str, int, str, float, float]], started_at: float | None) -> cost.Meter:
        """Each rank's (Ray node id, pid, node type, share of its node, GPUs): on the MLflow run, to see
        a run spread over nodes; and the meter of the node time they hold, going on from earlier attempts'."""
        types = {w[2] for w in where} | set(filter(None, self.earlier_tags.get(cost.NODE_TYPES_TAG, "").split(",")))
        if self.client:
            set_tags(self.client, self.run_id, {"platform.worker_nodes": ",".join(w[0] for w in where),
                                                "platform.worker_pids": ",".join(str(w[1]) for w in where),
                                                cost.NODE_TYPES_TAG: ",".join(sorted(types))})
        return cost.meter([w[2:] for w in where], self.earlier_metrics, started_at)

    def epoch(self, epoch: int, metrics: dict[str, float], best: tuple[int, str] | None = None, figures=None) -> None:
        """Epoch ``epoch``'s metrics; ``best``: (its epoch, the weights file) when it is the best so far,
        logged with ``figures()`` (the task's plots)."""
        if not self.client or epoch in self.logged:
            return
        log_metrics(self.client, self.run_id, metrics, step=epoch)
        if best:
            log_file(self.client, self.run_id, best[1], "checkpoints")
            set_tags(self.client, self.run_id, {"platform.best_epoch": best[0]})
            if figures:
                log_figures(self.client, self.run_id, figures())

    def finish(self) -> None:
        """Every record delivered: waits for a tracking server that is away, up to its limit."""
        if self.client:
            self.client.deliver(wait=True)
            self.client.close()

    def progress(self, epoch: int, metrics: dict[str, float], objective: str, steps: int, samples: int,
                 world_size: int, train_seconds: float, epoch_seconds: float) -> None:
        """The console line of a finished epoch, with the time the rest will take."""
        self.epoch_seconds.append(epoch_seconds)
        key = f"val/{objective}"
        self.say(f"epoch {epoch}/{self.epochs}  {steps / max(train_seconds, 1e-9):.1f} steps/s  "
                 f"train/loss {metrics['train/loss']:.4f}  {key} {metrics[key]:.4f} "
                 f"(best {metrics[f'best/{objective}']:.4f})  {samples} samples on {world_size} "
                 f"worker{'s' if world_size > 1 else ''} in {train_seconds:.1f}s  "
                 f"ETA {format_duration((self.epochs - epoch) * statistics.median(self.epoch_seconds))}")
