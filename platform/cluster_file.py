"""A Ray cluster launcher file checked offline, before ``ray up`` (``python -m platform.cluster cluster.yaml``):
Ray's own autoscaler validator, then the platform's rules (no password written in the file, an MLflow
server that requires a login and whose credentials reach the workers, no port open to the world, the MLflow
server on a private address with a database behind it, spot workers that can scale to zero, the head
advertising ``trial_driver``, ...).
"""

from __future__ import annotations

import re

from platform.cluster import TRIAL_DRIVER_RESOURCE, TRIAL_DRIVER_SLOTS

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


# A password written out: in a URI (scheme://user:pw@), SQL (PASSWORD 'pw'), a flag (--password pw),
# a key or a variable (password: pw, db_password = pw, PGPASSWORD=pw). What follows a `$` (a variable,
# "$(cat ~/.mlflow/db_password)") or is a printf placeholder (%s) is read at set-up, not written here.
_WRITTEN_PASSWORDS = (
    ("a password in a URI", re.compile(r"[a-z][a-z0-9+.-]*://[^:/@\s'\"]*:(?P<value>[^@\s'\"/]+)@", re.I)),
    ("a PASSWORD '...' statement", re.compile(r"\bPASSWORD\s+(?P<value>'[^']*'|\"[^\"]*\")", re.I)),
    ("a --password flag", re.compile(r"(?<![\w-])--?pass(?:word|wd)?(?:=|\s+)(?P<value>\S+)", re.I)),
    ("a password or secret key setting",
     re.compile(r"\b\w*(?:pass(?:word|wd)|secret_key)\w*\s*[:=]\s*(?P<value>[^\s,;}]+)", re.I)),
)
CREDENTIALS_FILE = ".mlflow/credentials"  # MLflow's client reads its login there (mlflow_tracking_username/password)


def _written(value: str) -> bool:
    value = value.strip("'\"")
    return bool(value) and not value.startswith(("$", "%s", "***"))


def _scalars(node, key: str = ""):
    """(the key above it, the scalar node) for every string in a composed YAML document."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            yield from _scalars(value_node, str(key_node.value))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _scalars(item, key)
    elif isinstance(node, yaml.ScalarNode):
        yield key, node


def _line(lines: list[str], node, text: str) -> int:
    """The file's line (1-based) where ``text`` of ``node``'s value is written (a command folded over
    several lines: the line that holds it), else the line the value starts on."""
    first, last = node.start_mark.line, node.end_mark.line
    probe = text[:24]
    return next((i + 1 for i in range(first, min(last, len(lines) - 1) + 1) if probe in lines[i]), first + 1)


def secret_problems(text: str) -> list[str]:
    """``line N: ...`` for each password written in a cluster (or Kubernetes) file, each ``mlflow server``
    that anyone who reaches it may use without a login, and MLflow credentials that never reach the workers."""
    import yaml

    lines, problems, servers, values = text.splitlines(), [], [], []
    for root in yaml.compose_all(text, Loader=yaml.SafeLoader):
        for key, node in _scalars(root):
            value = str(node.value)
            values.append(value)
            if re.search(r"pass(word|wd)", key, re.I) and _written(value):
                problems.append(f"line {node.start_mark.line + 1}: {key} is a password written in the file; generate "
                                f"it at set-up (openssl rand -hex 24 > ~/.mlflow/..., readable only by its user) or "
                                f"keep it in a Secret, and read it from there")
                continue
            for kind, pattern in _WRITTEN_PASSWORDS:
                match = next((m for m in pattern.finditer(value) if _written(m["value"])), None)
                if match:
                    problems.append(f"line {_line(lines, node, match[0])}: {kind} written in the file; generate it "
                                    f"at set-up (openssl rand -hex 24 > ~/.mlflow/db_password, readable only by its "
                                    f"user) and read it from there (\"$(cat ~/.mlflow/db_password)\", ~/.pgpass)")
                    break
            options = _options(value, ("mlflow", "server"))
            if options is not None:
                servers.append((node, options))
    proxy = any(re.search(r"oauth2-proxy|auth_basic", v) for v in values)  # an authenticating proxy in front
    for node, options in servers:
        if options.get("app-name") != "basic-auth" and not proxy:
            problems.append(f"line {_line(lines, node, 'mlflow server')}: mlflow server without --app-name basic-auth "
                            f"lets anyone who reaches it read and change every run; add --app-name basic-auth (with "
                            f"MLFLOW_AUTH_CONFIG_PATH and an admin password generated at set-up) or an "
                            f"authenticating proxy in front")
    launcher = [d for d in yaml.safe_load_all(text) if isinstance(d, dict) and "available_node_types" in d]
    if servers and launcher and not proxy and not any(
            str(p).endswith(CREDENTIALS_FILE) for p in launcher[0].get("cluster_synced_files") or []):
        problems.append(f"cluster_synced_files has no ~/{CREDENTIALS_FILE}: the workers' trials would log to MLflow "
                        f"without a login and be refused; add /home/ubuntu/{CREDENTIALS_FILE} (written at set-up "
                        f"on the head)")
    return problems


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
            text = f.read()
        config = yaml.safe_load(text)
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
    problems = secret_problems(text) + cluster_file_problems(config)
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
