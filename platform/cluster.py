"""Connecting to Ray: a running cluster when there is one, else a local Ray on loopback.

Ray workers import ray, and with it ``platform``, before any driver directory reaches
``sys.path``; the standard module would win and ``platform.*`` imports would fail. So
every Ray job the platform starts carries the project root on PYTHONPATH from
interpreter start: as ``env_vars`` for a cluster on this machine, or through the job's
``working_dir`` (which Ray prepends to PYTHONPATH itself) under ``ray job submit``.
"""

from __future__ import annotations

import math
import os

from platform import PROJECT_ROOT

# A tiny custom resource that places the Tune trial functions (Ray Train's drivers) on
# nodes that advertise it: the head node here and in cluster.yaml, never a spot worker.
TRIAL_DRIVER_RESOURCE = "trial_driver"
TRIAL_DRIVER_SLOTS = 1000
DATA_CPUS = 1
TRIAL_DRIVER_MEMORY = 128 * 1024**2  # bytes; Ray needs some resource in a bundle


def _existing_address(address: str) -> str | None:
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address(address or None)
    except (ConnectionError, ValueError):
        return None


def runtime_env() -> dict:
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}  # under `ray job submit`: the job's working_dir already leads PYTHONPATH
    pythonpath = os.pathsep.join(p for p in [PROJECT_ROOT, os.environ.get("PYTHONPATH", "")] if p)
    return {"env_vars": {"PYTHONPATH": pythonpath}}


def connect(address: str = "") -> None:
    """``ray.init`` once: the given address, $RAY_ADDRESS or a running local Ray, else a new local one."""
    import ray

    if ray.is_initialized():
        return
    existing = _existing_address(address)
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
        ray.init(address=existing, runtime_env=runtime_env() or None, configure_logging=False)


def _stay_on_loopback() -> None:
    # Ray on Linux swaps 127.0.0.1 for the machine's network address unless this is set;
    # a laptop's private Ray has no business listening on the network.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def trial_resources() -> dict:
    """What one Tune trial function (a Ray Train driver) asks for: no CPU, on a safe node.

    Where no node advertises ``trial_driver``, a memory-only bundle: even 0.01 CPU would
    leave the last CPU fractional, and Ray Data's read tasks (a whole CPU each) would
    never be scheduled.
    """
    import ray

    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) > 0:
        return {TRIAL_DRIVER_RESOURCE: 1}
    return {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}


def max_concurrent_trials(num_workers: int, cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float) -> int:
    """How many Train runs fit on the cluster at once, so no trial waits for workers that cannot exist."""
    import ray

    total = ray.cluster_resources()
    # Keep CPUs free for Ray Data's read tasks: Train workers holding every CPU starve the
    # pipeline that feeds them, and the whole sweep hangs.
    spare = DATA_CPUS if total.get("CPU", 0) > num_workers * cpus_per_worker else 0
    fits = math.floor((total.get("CPU", 0) - spare) / (num_workers * cpus_per_worker))
    if use_gpu:
        fits = min(fits, math.floor(total.get("GPU", 0) / (num_workers * gpus_per_worker)))
    return max(1, fits)
