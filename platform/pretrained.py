"""``init_from=``: the weights a run starts from, wherever they were recorded.

Three spellings, one meaning, always resolved to the best weights a platform run logged:

    init_from=0a1b2c...                      an MLflow run id (its checkpoints/best_model.pt)
    init_from=models:/mae/3                  a registered model version (or models:/mae/latest): its weights.safetensors
    init_from=/path/to/best_model.pt         a checkpoint file (best_model.pt, a loop state.pt, or .safetensors)

Weights are always read by ``model_files.read_weights`` (safetensors, or ``torch.load(weights_only=True)``):
a file can never run code. A version an earlier platform registered as a pickled PyTorch model is
never unpickled: its run's best_model.pt is read instead. The run they came from is recorded, so
the MLflow UI links a fine-tuning run to its pretraining run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from platform import config as config_lib
from platform import model_files, runs, tracking
from platform.config import ConfigError

BEST_ARTIFACT = "checkpoints/best_model.pt"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/]+)/(?P<version>\d+|latest)$")


@dataclass(frozen=True)
class Source:
    init_from: str  # what the user wrote
    run_id: str | None  # the MLflow run whose weights these are (None for a bare file)
    path: str | None  # a local checkpoint file (None: ``weights``, or the run's best_model.pt)
    weights: str | None = None  # a registered version's weights.safetensors (its artifact URI); None: not one

    def tags(self) -> dict[str, str]:
        tags = {"platform.init_from": self.init_from}
        if self.run_id:
            tags["platform.init_run_id"] = self.run_id
        return tags


def in_store(reference: str) -> bool:
    """Whether ``reference`` names weights in an MLflow store (a run id, a registered model), not a file."""
    return bool(_MODEL_URI.match(reference) or _RUN_ID.match(reference)) and not os.path.exists(reference)


def source_for(cfg, tracking_uri: str) -> Source | None:
    """The resolved ``init_from`` of a config whose task has one and sets it; None otherwise."""
    init_from = getattr(cfg, "init_from", "")
    if not init_from:
        return None
    if _MODEL_URI.match(init_from) or _RUN_ID.match(init_from):
        if tracking_uri.startswith("sqlite:///") and not os.path.exists(tracking_uri[len("sqlite:///"):]):
            raise ConfigError(f"init_from={init_from}: there is no MLflow store at {tracking_uri} to look it up in; "
                              f"set mlflow.tracking_uri to the store of the pretraining run")
        return resolve(init_from, tracking.MlflowClient(tracking_uri))
    return resolve(init_from, None)


def inherited(task, source: Source | None, tracking_uri: str, given: set[str]) -> dict:
    """The config values ``task.inherit`` takes from the pretraining run's parameters, except the ``given`` keys.

    A fine-tuning run must build its encoder the size the pretraining run's was; reading
    the sizes from the run leaves nothing to repeat on the command line, and nothing to get wrong.
    """
    if not task.inherit or source is None or not source.run_id:
        return {}
    params = tracking.MlflowClient(tracking_uri).get_run(source.run_id).data.params
    schema = config_lib.schema_for(task)
    values = {}
    for own, theirs in task.inherit.items():
        for key, value in params.items():
            mine = own + key[len(theirs):]
            if key.startswith(theirs) and mine not in given and config_lib.is_value_key(schema, mine):
                values[mine] = config_lib.from_param(value)
    return values


def describe_inherited(values: dict, source: Source) -> str:
    settings = " ".join(f"{k}={v}" for k, v in sorted(values.items()))
    return f"from init_from={source.init_from} (run {source.run_id}): {settings}"


def initialise(model, task, cfg, tracking_uri: str) -> list[str] | None:
    """Load the pretrained weights ``cfg.init_from`` names into a fresh ``model``; the names left new."""
    source = source_for(cfg, tracking_uri)
    if source is None:
        return None
    client = tracking.MlflowClient(tracking_uri) if source.run_id else None
    state = load_state(source, client)
    return (task.init_weights or (lambda m, s, c: load_matching(m, s)))(model, state, cfg)


def resolve(init_from: str, client: tracking.MlflowClient | None, setting: str = "init_from") -> Source:
    """Check that ``init_from`` points at weights, before any cluster work; a one-line error if not
    (naming ``setting``: ``model=`` for ``platform.evaluate`` and ``platform.predict``)."""
    expected = ("expected an MLflow run id, models:/<name>/<version|latest>, or a path to best_model.pt")
    match = _MODEL_URI.match(init_from)
    if match:
        name, version = match["name"], match["version"]
        versions = runs.model_versions(client, name)
        if not versions:
            raise ConfigError(f"{setting}={init_from}: no registered model {name!r} in this MLflow store; {expected}")
        if version == "latest":
            chosen = max(versions, key=lambda v: int(v.version))
        else:
            chosen = next((v for v in versions if str(v.version) == version), None)
            if chosen is None:
                known = ", ".join(sorted((str(v.version) for v in versions), key=int))
                raise ConfigError(f"{setting}={init_from}: model {name!r} has no version {version}; it has {known}")
        return _from_run(init_from, chosen.run_id, client, setting, model=chosen.source)
    if init_from.startswith("models:/"):
        raise ConfigError(f"{setting}={init_from}: not a model URI; {expected}")
    if _RUN_ID.match(init_from) and not os.path.exists(init_from):
        return _from_run(init_from, init_from, client, setting)
    path = os.path.abspath(os.path.expanduser(init_from))
    if os.path.isfile(path):
        return Source(init_from, None, path)
    raise ConfigError(f"{setting}={init_from}: no such run or file; {expected}")


def _from_run(init_from: str, run_id: str, client: tracking.MlflowClient, setting: str,
              model: str | None = None) -> Source:
    """The weights of run ``run_id``, or of the registered version's ``model`` when it is in the platform's format."""
    try:
        client.get_run(run_id)
    except Exception:  # MLflow raises its own RESOURCE_DOES_NOT_EXIST error
        raise ConfigError(f"{setting}={init_from}: no MLflow run {run_id} in this store") from None
    weights = _weights_file(client, model) if model else None
    if weights:
        return Source(init_from, run_id, None, weights)
    folder, name = os.path.split(BEST_ARTIFACT)
    if name not in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, folder)}:
        if model:  # an earlier platform's pickled PyTorch model, and no weights beside it to read instead
            raise ConfigError(f"{setting}={init_from}: its model is not in the platform's format (an earlier version's "
                              f"pickle?), which is never unpickled here, and its run {run_id} logged no {BEST_ARTIFACT} "
                              f"to read instead; train it again")
        raise ConfigError(f"{setting}={init_from}: run {run_id} logged no {BEST_ARTIFACT} (did it finish an epoch?)")
    return Source(init_from, run_id, None)


def _weights_file(client: tracking.MlflowClient, model: str) -> str | None:
    """Where the weights of a registered version's MLflow model (its source, models:/m-...) are, when it
    is in the platform's format (``model_files``); None for another (an earlier version's pickle)."""
    folder = f"data/{model_files.DATA}"
    model_id = model.removeprefix("models:/")
    try:
        names = {a.path.rsplit("/", 1)[-1] for a in client.list_logged_model_artifacts(model_id, folder)}
        location = client.get_logged_model(model_id).artifact_location
    except Exception:  # not a logged model of this store (an MLflow 2 runs:/ source): MLflow's own errors
        return None
    return f"{location}/{folder}/{model_files.WEIGHTS}" if model_files.WEIGHTS in names else None


def load_state(source: Source, client: tracking.MlflowClient | None = None, setting: str = "init_from") -> dict:
    """The source's weights as a CPU state dict (a loop ``state.pt`` yields its model part), read by
    ``model_files.read_weights``: never by unpickling."""
    import tempfile

    import mlflow.artifacts

    what = f"{setting}={source.init_from}"
    if source.path:
        return model_files.read_weights(source.path, what)
    if source.weights:
        with tempfile.TemporaryDirectory(prefix="deeplense-") as folder:
            path = mlflow.artifacts.download_artifacts(artifact_uri=source.weights, dst_path=folder,
                                                       tracking_uri=client._tracking_client.tracking_uri)
            return model_files.read_weights(path, what)
    with tracking.downloaded(client, source.run_id, BEST_ARTIFACT) as path:
        return model_files.read_weights(path, what)


def load_matching(module, state: dict, prefix: str = "") -> list[str]:
    """Copy into ``module`` the entries of ``state`` under ``prefix`` whose names and shapes match.

    Returns the module's parameter names that stayed as initialised (new heads), so a
    run can say what it did not take from the pretrained weights.
    """
    own = module.state_dict()
    taken = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    usable = {k: v for k, v in taken.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"none of the pretrained weights{f' under {prefix!r}' if prefix else ''} fit this model; "
                          f"was init_from trained by a compatible task and model size?")
    module.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)
