"""What produced a run, recorded with it, and the way back: ``from_run=<run id>``.

Every run a command opens carries the project's git commit (``mlflow.source.git.commit``, the UI's
Source column), the entry point (``mlflow.source.name``), the exact command line, a flag and the
diff when the tree had uncommitted changes, and the versions of the libraries that decide the
numbers. Its seeds and the simulator's version are among its logged parameters.
``from_run=`` starts a new command from a run's recorded config, the command line on top.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from platform import config as config_lib
from platform import registry, tracking

LIBRARIES = ("torch", "ray", "timm", "optuna", "mlflow", "numpy")
COMMAND_TAG = "platform.command"
DIRTY_TAG = "platform.git_dirty"
DIFF_ARTIFACT = "source/uncommitted.diff"
# Settings a run recorded that say where it ran, not what it is: never carried into another command.
NOT_CARRIED = ("train.name", "train.storage_path", "tune.name", "tune.space", "tune.resume", "ray.address",
               "mlflow.tracking_uri")
DATA_SOURCE = ("data.path", "data.source", "data.preset")
DATA_DECIDED_TAG = "platform.data_decided"  # the settings the run's data decided (a class weight, target statistics)  # dropped together when a command names other data
invoked: list[str] = []  # this process's command: set by cli.run


def project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", project_root(), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def versions() -> dict[str, str]:
    import importlib.metadata

    from platform.data.simulate import SIMULATOR_VERSION

    found = {"python": sys.version.split()[0], "simulator": str(SIMULATOR_VERSION)}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def source_tags() -> dict[str, str]:
    """MLflow's own source tags and the command line: cheap, for every run (a sweep's trials too)."""
    tags = {"mlflow.source.type": "LOCAL",
            "mlflow.source.name": invoked[2] if invoked[:2] == ["python", "-m"] and len(invoked) > 2 else "platform"}
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if invoked:
        tags[COMMAND_TAG] = shlex.join(invoked)
    return tags


def record(client, run_id: str) -> None:
    """Everything that produced this command's run, on the run: source tags, versions, uncommitted changes."""
    tags = {**source_tags(), **{f"platform.version.{k}": v for k, v in versions().items()}}
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags[DIRTY_TAG] = "true" if status.strip() else "false"
        if status.strip():
            tracking.log_text(client, run_id, _git("diff", "HEAD") or "", DIFF_ARTIFACT)
    tracking.set_tags(client, run_id, tags)


def recorded_config(client, run_id: str, drop: tuple[str, ...] = ()) -> tuple[str, dict, list[str]]:
    """(task, the config a run logged as one layer of settings, the recorded keys this version has not).

    Where it ran (``NOT_CARRIED``) and the ``drop`` keys are left out.
    """
    run = client.get_run(run_id)
    task_name = run.data.tags.get(tracking.TASK_TAG, "")
    schema = config_lib.schema_for(registry.get(task_name))
    layer, unknown = {}, []
    for key, value in sorted(run.data.params.items()):
        if key in NOT_CARRIED or key in drop or key == "task":
            continue
        if not config_lib.is_value_key(schema, key):
            unknown.append(key)
            continue
        layer[key] = config_lib.from_param(value)
    return task_name, layer, unknown


def from_run(overrides: dict, uri: str, task_given: str | None) -> tuple[str | None, dict]:
    """``from_run=<run id>`` taken out of ``overrides``: (its task, its recorded config as a layer);
    (None, {}) without it. Says which recorded values it could not apply."""
    run_id = str(overrides.pop("from_run", "") or "")
    if not run_id:
        return None, {}
    if not tracking.store_exists(uri):
        raise config_lib.ConfigError(f"from_run={run_id}: no MLflow store at {uri}; set mlflow.tracking_uri to the "
                                     f"store that holds the run")
    client = tracking.MlflowClient(uri)
    try:
        client.get_run(run_id)
    except Exception:  # MLflow's own RESOURCE_DOES_NOT_EXIST
        raise config_lib.ConfigError(f"from_run={run_id}: no such run in {uri}") from None
    # Other data decides again what the run's data decided (a class weight from its label counts, ...).
    decided_by_data = client.get_run(run_id).data.tags.get(DATA_DECIDED_TAG, "")
    redecided = tuple(decided_by_data.split(",")) if decided_by_data and any(k in overrides for k in DATA_SOURCE) else ()
    task_name, layer, unknown = recorded_config(client, run_id, drop=redecided)
    if task_given and task_given != task_name:
        raise config_lib.ConfigError(f"task={task_given}, but from_run={run_id} is a run of task={task_name}")
    overridden = sorted(k for k in overrides if k in layer and layer[k] != overrides[k])
    print(f"from_run={run_id}: {len(layer)} recorded settings of task {task_name}"
          + (f"; the command line changes {', '.join(overridden)}" if overridden else "")
          + (f"; the new data decides {', '.join(redecided)} again" if redecided else "")
          + (f"; not applied (unknown in this version): {', '.join(unknown)}" if unknown else ""), flush=True)
    return task_name, layer


def command_line(argv: list[str], module: str) -> list[str]:
    return ["python", "-m", module, *argv]
