"""Connecting to Ray: a running cluster when there is one, else a local Ray on loopback.

Ray workers import ray, and with it ``platform``, before any driver directory reaches
``sys.path``; the standard module would win and ``platform.*`` imports would fail. So
every Ray job the platform starts carries the project root on PYTHONPATH from
interpreter start: as ``env_vars`` for a cluster on this machine, as a shipped
``working_dir`` (which Ray prepends to PYTHONPATH itself) for a cluster elsewhere, and
through the job's own ``working_dir`` under ``ray job submit``.
"""

from __future__ import annotations

import math
import os
import re
import socket

from platform import PROJECT_ROOT

# A tiny custom resource that places the Tune trial functions (Ray Train's drivers) on
# nodes that advertise it: the head node here and in cluster.yaml, never a spot worker.
TRIAL_DRIVER_RESOURCE = "trial_driver"
TRIAL_DRIVER_SLOTS = 1000
DATA_CPUS = 1
TRIAL_DRIVER_MEMORY = 128 * 1024**2  # bytes; Ray needs some resource in a bundle
# The lines a run prints ("[mae] epoch 2/5 ...", platform.loop). Ray folds lines from
# different processes that differ only in their numbers into one "[repeated Nx]" line,
# which would swallow one trial's "epoch 2/2" behind another's "epoch 1/2".
RUN_LINE = r"^\[[\w-]+\] "


def target_address(address: str = "") -> str | None:
    """Where this command's Ray is: ``address`` or $RAY_ADDRESS, else a running local Ray, else None (start one).

    A bad explicit address is a one-line error, never a silent local Ray instead.
    """
    from ray._private import services

    from platform.config import ConfigError

    explicit = address or os.environ.get("RAY_ADDRESS", "")
    setting = "ray.address" if address else "RAY_ADDRESS"
    if explicit.startswith(("http://", "https://")):
        raise ConfigError(f"{setting}={explicit} is a dashboard (job submission) address; give the head's "
                          f"host:6379, or submit the command with `ray job submit --address {explicit}`")
    if explicit.startswith("ray://"):
        return explicit  # Ray Client
    if explicit.startswith(("127.0.0.1:", "localhost:")):
        _stay_on_loopback()  # else Ray swaps 127.0.0.1 for this machine's network address
    try:
        found = services.canonicalize_bootstrap_address(explicit or None)
    except (ConnectionError, ValueError) as error:
        if explicit and explicit != "auto":
            raise ConfigError(f"{setting}={explicit}: {' '.join(str(error).split())}; expected host:port of a "
                              f"running Ray head, or leave it unset for a local Ray") from None
        return None
    if found:
        host, port = found.rsplit(":", 1)
        try:  # ray.init would wait minutes for a head that is not there
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as error:
            if not explicit or explicit == "auto":
                return None  # the address file of a local Ray that died without cleaning up: start a new one
            raise ConfigError(f"{setting}={explicit}: no Ray head answers at {found} ({error}); start one with "
                              f"`ray start --head`, or leave it unset for a local Ray") from None
    return found


# Left behind when the project is shipped to another machine's workers.
SHIP_EXCLUDES = [".venv", ".git", "ray_results", "mlruns", "mlflow.db", "__pycache__"]


def runtime_env(same_machine: bool = True) -> dict:
    if _job_ships_its_code():
        return {}  # `ray job submit --working-dir .`: the job's copy of the project leads PYTHONPATH
    if not same_machine:
        # This checkout's path means nothing on other nodes: ship the project; Ray unpacks it
        # on every node and puts it first on the workers' PYTHONPATH.
        return {"working_dir": PROJECT_ROOT, "excludes": SHIP_EXCLUDES}
    pythonpath = os.pathsep.join(p for p in [PROJECT_ROOT, os.environ.get("PYTHONPATH", "")] if p)
    return {"env_vars": {"PYTHONPATH": pythonpath}}


def _job_ships_its_code() -> bool:
    """Whether this is a `ray job submit` whose own runtime env brings the project to its workers.

    Submitted without ``--working-dir`` (as users type it), the job runs in the folder its head was
    started from: this driver found the project there, and its workers get it as any driver's do.
    """
    import json

    from platform.config import under_ray_job

    if not under_ray_job():
        return False
    job = (json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("runtime_env") or {})
    return bool(job.get("working_dir") or job.get("py_modules") or "PYTHONPATH" in (job.get("env_vars") or {}))


def _on_this_machine(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
        return True
    try:
        return host in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return False


def connect(address: str = "") -> None:
    """``ray.init`` once: the given address, $RAY_ADDRESS or a running local Ray, else a new local one."""
    import ray

    from platform.config import ConfigError

    if ray.is_initialized():
        return
    keep_run_lines()
    existing = target_address(address)
    if existing is None:
        _stay_on_loopback()
        os.environ["PYTHONPATH"] = runtime_env()["env_vars"]["PYTHONPATH"]
        ray.init(
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            resources={TRIAL_DRIVER_RESOURCE: TRIAL_DRIVER_SLOTS},
            runtime_env=runtime_env(),
            log_to_driver=True,
            configure_logging=False,
        )
    else:
        try:
            env = runtime_env(same_machine=not existing.startswith("ray://") and _on_this_machine(existing))
            ray.init(address=existing, runtime_env=env or None, configure_logging=False)
        except ConnectionError as error:
            raise ConfigError(f"no Ray cluster answers at {existing} ({' '.join(str(error).split())[:200]}); "
                              f"start one with `ray start --head`, or leave ray.address unset for a local Ray") from None


def keep_run_lines() -> None:
    """Have this driver print every line a run prints (each epoch's), never fold them; a user's $RAY_DEDUP_LOGS_ALLOW_REGEX wins."""
    from ray._private import ray_logging

    if "RAY_DEDUP_LOGS_ALLOW_REGEX" in os.environ:
        return
    for deduplicator in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        deduplicator.allow_re = re.compile(RUN_LINE)


def check_fits(scaling, address: str = "") -> None:
    """Refuse, before any work, a run that the local Ray this command would start can never place.

    A running cluster is trusted instead: its autoscaler may add the nodes a trial waits for.
    """
    from platform.config import ConfigError

    if target_address(address) is not None:
        return
    from ray._private.utils import get_num_cpus

    cpus = get_num_cpus()
    workers = processes(scaling.num_workers)
    need = workers * scaling.cpus_per_worker
    if need + DATA_CPUS > cpus:
        fix = (f"lower them (e.g. scaling.cpus_per_worker={(cpus - DATA_CPUS) / workers:g})"
               if cpus > DATA_CPUS else "use a machine with more CPUs")
        raise ConfigError(
            f"scaling.num_workers={scaling.num_workers} x scaling.cpus_per_worker={scaling.cpus_per_worker:g} "
            f"needs {need:g} CPUs plus {DATA_CPUS} for reading data, but the local Ray has {cpus}; {fix} "
            f"or set ray.address")
    if scaling.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if workers * scaling.gpus_per_worker > gpus:
            raise ConfigError(
                f"scaling.use_gpu=true needs {workers * scaling.gpus_per_worker:g} GPUs but this machine "
                f"has {gpus}; set scaling.use_gpu=false or ray.address of a cluster with GPUs")


def _stay_on_loopback() -> None:
    # Ray on Linux swaps 127.0.0.1 for the machine's network address unless this is set;
    # a laptop's private Ray has no business listening on the network.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def processes(num_workers: int) -> int:
    """Processes that train in one run: ``scaling.num_workers=0`` trains in the run's own process."""
    return max(num_workers, 1)


def trial_resources(scaling) -> dict:
    """What one Tune trial function asks for.

    A Ray Train driver (``scaling.num_workers`` >= 1): no CPU, on a safe node. Where no node
    advertises ``trial_driver``, a memory-only bundle: even 0.01 CPU would leave the last CPU
    fractional, and Ray Data's read tasks (a whole CPU each) would never be scheduled.
    A trial that trains in its own process (``scaling.num_workers=0``): one worker's resources.
    """
    import ray

    if scaling.num_workers == 0:
        return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) > 0:
        return {TRIAL_DRIVER_RESOURCE: 1}
    return {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}


def max_concurrent_trials(num_workers: int, cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float) -> int:
    """How many Train runs fit on the cluster at once, so no trial waits for workers that cannot exist."""
    import ray

    total = ray.cluster_resources()
    num_workers = processes(num_workers)
    # Keep CPUs free for Ray Data's read tasks: Train workers holding every CPU starve the
    # pipeline that feeds them, and the whole sweep hangs.
    spare = DATA_CPUS if total.get("CPU", 0) > num_workers * cpus_per_worker else 0
    fits = math.floor((total.get("CPU", 0) - spare) / (num_workers * cpus_per_worker))
    if use_gpu:
        fits = min(fits, math.floor(total.get("GPU", 0) / (num_workers * gpus_per_worker)))
    return max(1, fits)


if __name__ == "__main__":  # ``python -m platform.cluster cluster.yaml``: a cluster file checked offline
    from platform import cli, cluster_file

    cli.exit_with(cluster_file.main)
