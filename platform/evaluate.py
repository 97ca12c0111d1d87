"""``python -m platform.evaluate model=<model> [data.path=... | data.preset=...]``: a trained model
of any task scored on any data, with its task's metrics and plots.

    python -m platform.evaluate model=models:/classification/latest data.preset=model_iii
    python -m platform.evaluate model=0a1b2c... data.path=/data/dataset evaluate.out=predictions.csv
    python -m platform.evaluate model=/path/to/best_model.pt task=classification data.path=/data/dataset

``model=`` is a run id, ``models:/<name>/<version|latest>`` or a checkpoint file (then ``task=``
and the model's settings must be given). From a run, the config is the run's own, so the model
is built as it was trained; the command line changes the data (and anything else). The split
scored is ``evaluate.split`` (``test``: the held-out part of that data). A binary finder is scored
at the threshold its run chose on its validation split.

The scores go to a new MLflow run in the task's experiment, tagged and parametrised with the
model it scored (the UI links the two); per-image predictions (file or row, truth, outputs) to
its ``predictions/`` artifacts and to ``evaluate.out`` (``.csv`` or ``.parquet``).
"""

from __future__ import annotations

import os
import sys
import tempfile

from platform import cli, provenance, scoring, tracking
from platform import config as config_lib
from platform.trained import load_model, model_config, run_threshold


def data_of(cfg) -> str:
    return f"folder {cfg.data.path}" if cfg.data.path else f"simulated {cfg.data.preset} (seed {cfg.data.seed})"


def threshold_params(threshold: float | None, source) -> dict:
    """Where a finder's decision threshold came from, as params of the evaluation run."""
    if threshold is None:
        return {}
    return {"evaluate.threshold": threshold, "evaluate.threshold_from":
            f"the val split of run {source.run_id}" if source.run_id else "the default 0.5 (a bare checkpoint)"}


def main(argv: list[str]) -> int:
    task, cfg, settings, source, uri, client = model_config(argv, "evaluate")
    model = load_model(task, cfg, source, client)
    built = task.build_data(cfg)
    splits, decided = built if isinstance(built, tuple) else (built, {})
    if decided and not source.run_id:  # a bare checkpoint: the data's own settings; a run's recorded ones win
        cfg = config_lib.build(task.name, [config_lib.flatten(config_lib.to_dict(cfg)), decided])
    threshold = run_threshold(task, client, source)
    shards = splits[settings.evaluate.split]
    print(f"scoring model={settings.model} on the {settings.evaluate.split} split of {data_of(cfg)}: {shards.num_rows} images",
          flush=True)
    scored = scoring.score(model, task, cfg, shards, scoring.device_for(cfg.scaling.use_gpu), threshold)
    table = scoring.predictions(scored, list(cfg.data.classes))
    if settings.evaluate.out:
        os.makedirs(os.path.dirname(os.path.abspath(settings.evaluate.out)), exist_ok=True)
        scoring.write_table(table, settings.evaluate.out)
    client = client or tracking.MlflowClient(uri)
    experiment = tracking.experiment_id(client, cfg.mlflow.experiment or f"deeplense-{cfg.task}")
    name = f"evaluate-{(source.run_id or os.path.basename(source.path))[:8]}-{settings.evaluate.split}"
    tags = {tracking.TASK_TAG: cfg.task, tracking.KIND_TAG: "evaluation", "platform.model": settings.model,
            **({"platform.model_run_id": source.run_id} if source.run_id else {})}
    run_id = tracking.start_run(client, experiment, name, tags)
    provenance.record(client, run_id)
    with cli.ends_run(client, run_id):
        tracking.log_params(client, run_id, {**config_lib.flatten(config_lib.to_dict(cfg)), "model": settings.model,
                                             "evaluate.split": settings.evaluate.split,
                                             **threshold_params(threshold, source)})
        tracking.log_metrics(client, run_id, {f"{settings.evaluate.split}/{k}": v for k, v in scored.metrics.items()}, step=0)
        try:
            tracking.log_figures(client, run_id, scoring.figures(task, model, scored, cfg, threshold))
        except Exception as error:  # the numbers stand without their figures
            print(f"warning: the plots failed ({error})", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="deeplense-evaluate-") as folder:
            path = scoring.write_table(table, os.path.join(folder, f"{settings.evaluate.split}.csv"))
            tracking.log_file(client, run_id, path, scoring.PREDICTIONS)
    for key, value in scored.metrics.items():
        print(f"{settings.evaluate.split}/{key} = {value:.4f}")
    if settings.evaluate.out:
        print(f"predictions: {settings.evaluate.out}")
    print(f"MLflow run {run_id}\n{cli.ui_hint(uri, experiment, run_id)}")
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
