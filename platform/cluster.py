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
from dataclasses import dataclass

from platform import PROJECT_ROOT, console, cost

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


_started_here = False  # this process started the local Ray it uses: no autoscaler to ask


def connect(address: str = "") -> None:
    """``ray.init`` once: the given address, $RAY_ADDRESS or a running local Ray, else a new local one."""
    import ray

    from platform.config import ConfigError

    if ray.is_initialized():
        return
    keep_run_lines()
    console.drop_worker_lines()
    existing = target_address(address)
    if existing is None:
        global _started_here
        _started_here = True
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


def check_fits(scaling, address: str = "", reads_data: bool = False) -> None:
    """Refuse, before any work, a run that the local Ray this command would start can never place.

    A running cluster is trusted instead: its autoscaler may add the nodes a trial waits for.
    ``reads_data``: the run streams a split through Ray Data, whose read tasks need a CPU of their own.
    """
    from platform.config import AUTO, ConfigError

    if target_address(address) is not None:
        return
    from ray._private.utils import get_num_cpus

    cpus = get_num_cpus()
    workers = processes(scaling)
    data = DATA_CPUS if reads_data else 0
    need = workers * cpus_of(scaling)
    if need + data > cpus:
        fix = (f"lower them (e.g. scaling.cpus_per_worker={(cpus - data) / workers:g})"
               if cpus > data else "use a machine with more CPUs")
        per_worker = "auto (at least 1)" if scaling.cpus_per_worker == AUTO else f"{scaling.cpus_per_worker:g}"
        raise ConfigError(
            f"scaling.num_workers={scaling.num_workers} x scaling.cpus_per_worker={per_worker} "
            f"needs {need:g} CPUs{f' plus {data} for reading data' if data else ''}, but the local Ray has {cpus}; "
            f"{fix} or set ray.address")
    if scaling.use_gpu:
        gpus = local_gpus()
        if workers * scaling.gpus_per_worker > gpus:
            raise ConfigError(
                f"scaling.use_gpu=true needs {workers * scaling.gpus_per_worker:g} GPUs but this machine "
                f"has {gpus}; set scaling.use_gpu=false or ray.address of a cluster with GPUs")


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def settle_scaling(scaling, address: str, runs: int, reads_data: bool, driver_trains: bool = False) -> dict:
    """The numbers ``auto`` stands for in ``scaling``, as a config layer (logged like any setting).

    ``num_workers=auto``: 0, one worker in the run's own process (a sweep's trial process, placed by
    Ray like any worker); but 1 where the run's own process is the command's (``driver_trains``:
    ``platform.train``) and the command runs on a cluster (``address``), whose head node is no
    place to train. ``cpus_per_worker=auto``: on a local Ray of this machine, its CPUs shared by
    the ``runs`` that train at once (a sweep's trials; a GPU sweep's as many as its GPUs hold), less
    one for Ray Data when a split streams through it: all of them for one run, whole CPUs for each of
    several, a fraction only where trials outnumber CPUs. On a cluster, 1: a sweep's trials then
    spread over every node's CPUs.
    """
    from platform.config import AUTO

    layer = {}
    if scaling.num_workers == AUTO:
        layer["scaling.num_workers"] = 1 if driver_trains and target_address(address) is not None else 0
    if scaling.cpus_per_worker == AUTO:
        layer["scaling.cpus_per_worker"] = 1.0
        if target_address(address) is None:
            from ray._private.utils import get_num_cpus

            cpus = max(1, get_num_cpus() - (DATA_CPUS if reads_data else 0))
            workers = processes(scaling)
            runs = min(runs, max(1, cpus // workers))
            if scaling.use_gpu and local_gpus():
                runs = max(1, min(runs, math.floor(local_gpus() / (workers * scaling.gpus_per_worker) + 1e-9)))
            share = cpus / (runs * workers)
            layer["scaling.cpus_per_worker"] = float(math.floor(share)) if share >= 1 else share
    return layer


def _stay_on_loopback() -> None:
    # Ray on Linux swaps 127.0.0.1 for the machine's network address unless this is set;
    # a laptop's private Ray has no business listening on the network.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def in_process(scaling) -> bool:
    """Whether a run trains in its own process (``scaling.num_workers`` 0 or auto), not on Ray Train workers."""
    from platform.config import AUTO

    return scaling.num_workers in (0, AUTO)


def cpus_of(scaling) -> float:
    """A worker's CPUs; ``auto`` not yet settled (``settle_scaling``) counts as on a cluster: 1."""
    from platform.config import AUTO

    return 1.0 if scaling.cpus_per_worker == AUTO else scaling.cpus_per_worker


def processes(scaling) -> int:
    """Processes that train in one run: one that trains in its own process counts as one."""
    return 1 if in_process(scaling) else scaling.num_workers


def trial_resources(scaling) -> dict:
    """What one Tune trial function asks for.

    A Ray Train driver (``scaling.num_workers`` a number >= 1): no CPU, on a safe node. Where no node
    advertises ``trial_driver``, a memory-only bundle: even 0.01 CPU would leave the last CPU
    fractional, and Ray Data's read tasks (a whole CPU each) would never be scheduled.
    A trial that trains in its own process (``scaling.num_workers`` auto or 0): one worker's resources.
    """
    import ray

    if in_process(scaling):
        return {"CPU": cpus_of(scaling), **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) > 0:
        return {TRIAL_DRIVER_RESOURCE: 1}
    return {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}


@dataclass
class NodeType:
    """A kind of node the cluster has or its autoscaler can add."""

    name: str
    resources: dict  # what one node offers: {"CPU": 8, "GPU": 1, ...}
    max_nodes: int  # how many may run at once (the head: 1)
    up: int = 0  # how many are alive now
    instance: str = ""  # the cloud's instance type, for its price
    spot: bool = False


@dataclass
class Capacity:
    """How many trials a sweep runs at once, and why."""

    trials: int
    reason: str
    node_types: dict  # name -> NodeType; {} for a cluster of fixed nodes or a laptop


def node_types_of(config: dict) -> dict[str, NodeType]:
    """The node types of an autoscaler config (a cluster file as ``ray up`` hands it to the head)."""
    head = config.get("head_node_type")
    types = {}
    for name, spec in (config.get("available_node_types") or {}).items():
        node_config = spec.get("node_config") or {}
        instance = str(node_config.get("InstanceType") or node_config.get("machineType")
                       or (node_config.get("azure_arm_parameters") or {}).get("vmSize") or "")
        spot = ((node_config.get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
                or bool((node_config.get("scheduling") or {}).get("preemptible"))
                or (node_config.get("azure_arm_parameters") or {}).get("priority") == "Spot")
        resources = {**cost.INSTANCE_RESOURCES.get(instance, {}), **(spec.get("resources") or {})}
        types[name] = NodeType(name, resources, 1 if name == head else int(spec.get("max_workers", 0)),
                               instance=instance, spot=spot)
    return types


def autoscaler_config() -> dict | None:
    """The config the cluster's autoscaler runs with, or None for a cluster of fixed nodes.

    ``ray up`` starts the head with ``--autoscaling-config ~/ray_bootstrap_config.yaml``, which only
    the head's autoscaler process knows: read there, by a task on the head.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if _started_here:
        return None
    head = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]), None)
    if head is None:
        return None
    gcs = ray.get_runtime_context().gcs_address
    read = ray.remote(num_cpus=0, max_retries=0)(_autoscaler_config_on_head)
    config = ray.get(read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote(gcs),
                     timeout=120)
    provider = ((config or {}).get("provider") or {}).get("type")
    return config if provider and provider not in ("readonly", "local") else None


def _published_node_groups(alive: list[dict]) -> dict | None:
    """Ray's autoscaler state API: the node groups an autoscaler v2 (KubeRay's) publishes to the GCS,
    in a cluster file's shape; None where none are published."""
    from ray._private.state import state

    try:
        published = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without it
        return None
    if published is None or not published.node_group_configs:
        return None
    types = {g.name: {"resources": dict(g.resources), "max_workers": g.max_count if g.max_count >= 0 else 10**6}
             for g in published.node_group_configs}
    head = next((n for n in alive if "node:__internal_head__" in n["Resources"]), None)
    if head is not None:
        types.setdefault("head", {"resources": head["Resources"], "max_workers": 0})
    return {"provider": {"type": "published"}, "head_node_type": "head", "available_node_types": types}


def _autoscaler_config_on_head(gcs_address: str) -> dict | None:
    import psutil
    import yaml

    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if not any(a.endswith("monitor.py") for a in args) or f"--gcs-address={gcs_address}" not in args:
            continue
        path = next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
        if not path:
            return None
        with open(os.path.expanduser(path)) as f:
            return yaml.safe_load(f)
    return None


def trial_capacity(scaling, fixed: int = 0, reads_data: bool = True) -> Capacity:
    """How many trials of ``scaling`` this Ray runs at once (``capacity_of``), from its autoscaler's
    node types when it has one, else from the nodes it has."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    config = autoscaler_config() or _published_node_groups(alive)
    if config is None:
        return capacity_of(scaling, [NodeType(n["NodeID"][:8], n["Resources"], 1, up=1) for n in alive],
                           None, fixed, reads_data)
    node_types = node_types_of(config)
    mapping = cost.node_type_mapping()
    for node in alive:
        name = _type_of(node, config, mapping)
        if name in node_types:
            node_types[name].up += 1
    return capacity_of(scaling, list(node_types.values()), config, fixed, reads_data)


def capacity_of(scaling, kinds: list[NodeType], config: dict | None, fixed: int = 0,
                reads_data: bool = True) -> Capacity:
    """How many trials run at once: ``fixed`` (tune.max_concurrent) if given, else as many as the nodes
    ``kinds`` can hold, with ``config`` (an autoscaler's) as many as they can grow to. A trial no
    node could ever hold is refused in one line. ``reads_data``: trials stream a split through Ray Data.
    """
    from platform.config import ConfigError

    workers = processes(scaling)
    worker = {"CPU": cpus_of(scaling), **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    per_node = {k.name: workers_per_node(k.resources, worker) for k in kinds}
    if not any(per_node.values()):
        biggest = max(kinds, key=lambda k: (k.resources.get("GPU", 0), k.resources.get("CPU", 0)), default=None)
        offer = describe_resources(biggest.resources) if biggest else "nothing"
        where = "node type of its autoscaler" if config else "node of the cluster"
        raise ConfigError(f"a trial's worker needs {describe_resources(worker)} (scaling.cpus_per_worker, "
                          f"scaling.gpus_per_worker, scaling.use_gpu) but no {where} has that much (the largest: "
                          f"{offer}); lower them, or use a cluster with such nodes")
    head = config.get("head_node_type") if config else None
    # The autoscaler runs at most max_workers worker nodes in all: count the roomiest types first.
    budget = int(config.get("max_workers", 10**9)) if config else 10**9
    slots, parts = 0, []
    for kind in sorted(kinds, key=lambda k: -per_node[k.name]):
        count = kind.max_nodes if config is None or kind.name == head else min(kind.max_nodes, budget)
        if config is not None and kind.name != head:
            budget -= count
        if count and per_node[kind.name]:
            slots += count * per_node[kind.name]
            parts.append((kind, count))
    # Keep a CPU free for Ray Data's read tasks: Train workers holding every CPU starve the pipeline
    # that feeds them, and the whole sweep hangs. Splits in the object store need none.
    left = sum(k.resources.get("CPU", 0) * n for k, n in parts) - slots * worker["CPU"]
    spare = reads_data and left < DATA_CPUS and slots > workers
    if spare:
        slots -= math.ceil((DATA_CPUS - left) / worker["CPU"])
    most = max(1, slots // workers)
    trials = fixed or most
    each = f"{workers} workers of {describe_resources(worker)}" if workers > 1 else describe_resources(worker)
    if config is None:
        where = ", ".join(f"{describe_resources(k.resources)}" for k, _ in parts)
        where = f"{len(parts)} node{'s' if len(parts) > 1 else ''} ({where})"
    else:
        where = ", ".join(f"{n} x {k.name} ({describe_resources(k.resources)})" for k, n in parts)
        up = sum(k.up for k, _ in parts if k.name != head)
        where += f"; {up} up now, the autoscaler adds them"
    where += f"; {DATA_CPUS} CPU kept for Ray Data's reading" if spare else ""
    reason = (f"{trials} trials at once (tune.max_concurrent; the cluster can hold {most})" if fixed
              else f"up to {trials} trial{'s' if trials > 1 else ''} at once ({each} each): {where}")
    return Capacity(trials, reason, {k.name: k for k in kinds} if config else {})


def _type_of(node: dict, config: dict, mapping: dict) -> str:
    if "node:__internal_head__" in node["Resources"]:
        return config.get("head_node_type")
    return cost.node_type_of(node, mapping)


def workers_per_node(resources: dict, worker: dict) -> int:
    """How many workers of ``worker``'s resources fit on a node of ``resources``."""
    fits = [math.floor(resources.get(name, 0) / need + 1e-9) for name, need in worker.items() if need > 0]
    return max(0, min(fits, default=0))


def describe_resources(resources: dict) -> str:
    shown = [f"{resources[k]:g} {k}{'s' if resources[k] != 1 else ''}" for k in ("GPU", "CPU") if resources.get(k)]
    return ", ".join(shown) or "no CPU or GPU"


if __name__ == "__main__":  # ``python -m platform.cluster cluster.yaml``: a cluster file checked offline
    from platform import cli, cluster_file

    cli.exit_with(cluster_file.main)
