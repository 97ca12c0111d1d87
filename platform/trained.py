"""A trained model found by what a user calls it: a run id, ``models:/<name>/<version|latest>`` or
a checkpoint file; its recorded config, its weights, and the threshold its run chose on val. What
``platform.evaluate`` and ``platform.predict`` share."""

from __future__ import annotations

from dataclasses import dataclass, field

from platform import explain, model_files, pretrained, provenance, registry, runs, tracking
from platform import config as config_lib
from platform.config import ConfigError, choice

MODEL_EXPECTED = "a run id, models:/<name>/<version|latest>, or a best_model.pt path"


@dataclass
class Scoring:
    split: str = choice("test", ["test", "val", "train"])  # the split of the data that is scored
    out: str = ""  # also write the per-image predictions here: a .csv or .parquet file


@dataclass
class EvaluateSettings:
    model: str = ""  # required: MODEL_EXPECTED
    evaluate: Scoring = field(default_factory=Scoring)


def own_settings(overrides: dict, *, command: str) -> EvaluateSettings:
    """``model=`` and ``evaluate.*`` taken out of ``overrides`` and checked."""
    mine = {k: overrides.pop(k) for k in [k for k in overrides if k == "model" or k.startswith("evaluate.")]}
    settings = config_lib.build_from(EvaluateSettings, [mine])
    if not settings.model:
        raise ConfigError(f"model= is required: {MODEL_EXPECTED} (python -m platform.{command} model=... data.path=...)")
    if settings.evaluate.out and not settings.evaluate.out.endswith((".csv", ".parquet")):
        raise ConfigError(f"evaluate.out={settings.evaluate.out}: expected a .csv or .parquet file name")
    return settings


def model_config(argv: list[str], command: str):
    """(task, config, own settings, weights source, MLflow URI, MLflow client or None): the model's
    recorded config, the command line on top, every part checked before any work."""
    task_given = any(a.startswith("task=") for a in argv)
    task_name, overrides = config_lib.parse_cli(argv)
    settings = own_settings(overrides, command=command)
    uri = tracking.tracking_uri(str(overrides.get("mlflow.tracking_uri", "")))
    client = tracking.MlflowClient(uri) if tracking.store_exists(uri) else None
    needs_store = pretrained.in_store(settings.model)
    if needs_store and client is None:
        raise ConfigError(f"model={settings.model}: no MLflow store at {uri} to look it up in; set "
                          f"mlflow.tracking_uri to the store of the run that trained it")
    source = pretrained.resolve(settings.model, client if needs_store else None, setting="model")
    other_data = provenance.DATA_SOURCE if any(k in overrides for k in provenance.DATA_SOURCE) else ()
    # The weights are the run's own: where they once started from (init_from, a local pretrained_path) is
    # not loaded again, and need not exist here.
    recorded = (model_files.model_settings(provenance.recorded_config(client, source.run_id, drop=other_data)[1])
                if source.run_id else {})
    if source.run_id:
        trained_for = client.get_run(source.run_id).data.tags.get(tracking.TASK_TAG, "")
        if task_given and task_name != trained_for:
            raise ConfigError(f"task={task_name}, but model={settings.model} was trained by task={trained_for}")
        task_name = trained_for
    elif not task_given:
        raise ConfigError(f"model={settings.model} is a bare checkpoint: say which task it is for (task=...) and "
                          f"the model settings it was trained with")
    cfg = config_lib.build(task_name, [recorded, overrides])
    return registry.task_of(cfg), cfg, settings, source, uri, client


def load_model(task, cfg, source, client):
    """The task's model with the source's weights, every tensor matched, or a one-line error."""
    state = pretrained.load_state(source, client, setting="model")
    return model_files.build(task, cfg, state, f"model={source.init_from}")


def run_threshold(task, client, source) -> float | None:
    """A binary finder's threshold chosen on its run's validation split; 0.5 for a bare checkpoint,
    which has no val split to have chosen one on (never one tuned on the data being scored); None
    for a task that is not a finder."""
    if not task.threshold_metric:
        return None
    if not source.run_id:
        print(f"note: model={source.init_from} has no run, so no threshold chosen on its val split: "
              f"{task.name} is scored at 0.5", flush=True)
        return 0.5
    metric = f"val/{task.threshold_metric}"
    return explain.decision_threshold(task, {metric: runs.at_best_epoch(client, source.run_id, metric)})
