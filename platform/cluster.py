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
    from platform.config import under_ray_job

    if under_ray_job():
        return {}  # under `ray job submit`: the job's working_dir already leads PYTHONPATH
    if not same_machine:
        # This checkout's path means nothing on other nodes: ship the project; Ray unpacks it
        # on every node and puts it first on the workers' PYTHONPATH.
        return {"working_dir": PROJECT_ROOT, "excludes": SHIP_EXCLUDES}
    pythonpath = os.pathsep.join(p for p in [PROJECT_ROOT, os.environ.get("PYTHONPATH", "")] if p)
    return {"env_vars": {"PYTHONPATH": pythonpath}}


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


# ---------------------------------------------------------------------------- cluster.yaml

OPEN_TO_ALL = ("0.0.0.0/0", "::/0")
ANY_HOST = ("0.0.0.0", "::", "[::]")
DATABASES = ("postgresql", "mysql", "mssql", "sqlite")  # MLflow's SQL backends (a file store is no database)


def _options(command: str, program: tuple[str, ...]) -> dict[str, str] | None:
    """``--name value`` / ``--name=value`` options of the first ``program`` call in a shell command, or None."""
    import shlex

    for part in command.replace("&&", ";").replace("||", ";").split(";"):
        try:
            words = shlex.split(part.replace("\n", " "))
        except ValueError:
            continue
        for i in range(len(words) - len(program) + 1):
            if tuple(words[i:i + len(program)]) != program:
                continue
            options, rest = {}, words[i + len(program):]
            for j, word in enumerate(rest):
                if word.startswith("--"):
                    name, _, value = word[2:].partition("=")
                    options[name] = value if _ else (rest[j + 1] if j + 1 < len(rest) else "")
            return options
    return None


def _first(commands: list[str], program: tuple[str, ...]) -> dict[str, str] | None:
    return next((o for o in (_options(c, program) for c in commands) if o is not None), None)


def cluster_file_problems(config: dict) -> list[str]:
    """What ``cluster.yaml`` must keep beyond Ray's schema: on-demand head, spot workers from zero,
    MLflow with a database and object storage on a private address, a dashboard on loopback,
    no port but SSH open to the internet, results on object storage."""
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    for name, node_type in types.items():
        market = node_type.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType")
        if name == head:
            if market == "spot":
                problems.append(f"available_node_types.{name} is the head but asks for spot instances; the head "
                                f"(GCS, sweep driver, MLflow server) must be on demand")
            if node_type.get("resources", {}).get(TRIAL_DRIVER_RESOURCE, 0) <= 0:
                problems.append(f"available_node_types.{name}.resources needs {TRIAL_DRIVER_RESOURCE}: "
                                f"{TRIAL_DRIVER_SLOTS}, so trial drivers stay on the head")
            continue
        if market != "spot":
            problems.append(f"available_node_types.{name}.node_config.InstanceMarketOptions.MarketType is "
                            f"{market or 'unset'}; worker types run on spot (MarketType: spot)")
        if node_type.get("min_workers", 0) != 0:
            problems.append(f"available_node_types.{name}.min_workers={node_type['min_workers']}; expected 0 "
                            f"(no idle GPUs)")
        if "max_workers" not in node_type:
            problems.append(f"available_node_types.{name}.max_workers is unset; give each worker type its maximum")

    for rule in config.get("provider", {}).get("security_group", {}).get("IpPermissions", []) or []:
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [r.get("CidrIpv6") for r in
                                                                        rule.get("Ipv6Ranges", [])]
        if any(r in OPEN_TO_ALL for r in ranges) and not (rule.get("FromPort") == rule.get("ToPort") == 22):
            problems.append(f"provider.security_group.IpPermissions opens ports {rule.get('FromPort')}-"
                            f"{rule.get('ToPort')} to the internet; only SSH (22) may be, reach the rest "
                            f"through `ray dashboard` / SSH tunnels")

    head_start = config.get("head_start_ray_commands", [])
    mlflow = _first(head_start, ("mlflow", "server"))
    if mlflow is None:
        problems.append("head_start_ray_commands start no `mlflow server`; the head runs the tracking server")
    else:
        host = mlflow.get("host", mlflow.get("h", "127.0.0.1"))
        if host in ANY_HOST:
            problems.append(f"mlflow server --host {host} listens on every interface; bind the head's private "
                            f"address (--host \"$(hostname -I | awk '{{print $1}}')\")")
        backend = mlflow.get("backend-store-uri", "")
        if not backend.startswith(DATABASES):
            problems.append(f"mlflow server --backend-store-uri {backend or '(unset: ./mlruns files)'} is no "
                            f"database; expected postgresql://... (or mysql, sqlite)")
        artifacts = mlflow.get("artifacts-destination") or mlflow.get("default-artifact-root") or ""
        if "://" not in artifacts or artifacts.startswith("file://"):
            problems.append(f"mlflow server keeps artifacts at {artifacts or '(unset: the head disk)'}; expected "
                            f"object storage (--artifacts-destination s3://...)")
    ray_head = _first(head_start, ("ray", "start"))
    if ray_head is None or "head" not in ray_head:
        problems.append("head_start_ray_commands run no `ray start --head`")
    elif ray_head.get("dashboard-host", "localhost") not in ("127.0.0.1", "localhost"):
        problems.append(f"ray start --dashboard-host={ray_head['dashboard-host']} exposes the dashboard and job "
                        f"API; use 127.0.0.1 and `ray dashboard cluster.yaml`")

    setup = " ".join(config.get("setup_commands", []))
    results = re.search(r"DEEPLENSE_RESULTS=([^\s'\"]+)", setup)
    if not results or "://" not in results.group(1) or results.group(1).startswith("file://"):
        problems.append("setup_commands set no DEEPLENSE_RESULTS on object storage (s3://...); checkpoints on a "
                        "node's disk die with the node")
    return problems


def check_cluster_file(path: str) -> dict:
    """The cluster file, after Ray's own validator and ``cluster_file_problems``; a ConfigError names the first problem."""
    import copy
    import logging

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    from platform.config import ConfigError

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: {' '.join(str(error).split())}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a Ray cluster config (a YAML mapping)")
    logging.getLogger("ray.autoscaler").setLevel(logging.ERROR)  # its notes on defaults it fills in
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as error:  # jsonschema's ValidationError, ValueError, KeyError: all a bad file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{path}: Ray's validator: {message}") from None
    problems = cluster_file_problems(config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{path}: {problems[0]}{more}")
    return config


def main(argv: list[str]) -> int:
    """``python -m platform.cluster cluster.yaml``: check a cluster file offline before ``ray up``."""
    path = argv[0] if argv else "cluster.yaml"
    config = check_cluster_file(path)
    workers = {name: t.get("max_workers") for name, t in config["available_node_types"].items()
               if name != config["head_node_type"]}
    print(f"{path}: valid (Ray's validator and the platform's rules); head {config['head_node_type']}, "
          f"spot worker types {', '.join(f'{n} (0..{m})' for n, m in workers.items())}")
    return 0


if __name__ == "__main__":
    from platform import cli

    cli.exit_with(main)
