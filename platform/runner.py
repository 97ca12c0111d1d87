"""What ``platform.train`` and ``platform.tune`` share: one Ray Train run of a config, from the data
in the object store to the best model in MLflow. The same functions build a laptop's one-CPU run and
a cluster's 64-GPU one; only the config differs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

from mlflow.data.meta_dataset import MetaDataset

from platform import adapt, cluster, console, provenance, runs, tracking
from platform import config as config_lib
from platform import data as data_lib
from platform.data import shards as shards_lib


def built_data(task, cfg, space=None):
    """(the task's splits, ``cfg`` with the settings its data decided as one more layer on top, the
    tags that name those settings: ``from_run=`` with other data lets the new data decide them again).
    When a run (or a trial of a sweep's ``space``) adapts, the target domain's unlabelled images are
    one more split, ``adapt``."""
    adapt.check(task, cfg, space)
    built = task.build_data(cfg)
    splits, decided = built if isinstance(built, tuple) else (built, {})
    if adapt.adapting(cfg, space):
        splits = {**splits, adapt.SPLIT: data_lib.unlabelled(cfg.adapt.path, splits["train"], config_lib.cache_dir(cfg),
                                                             cfg.data.shard_size)}
    if decided:
        cfg = config_lib.build(task.name, [config_lib.flatten(config_lib.to_dict(cfg)), decided])
    return splits, cfg, ({provenance.DATA_DECIDED_TAG: ",".join(sorted(decided))} if decided else {})


def metrics_logged(task, cfg, val) -> set[str] | None:
    """The metric names a run of ``task`` logs: ``val/<each>`` of its ``evaluate`` over a few val rows
    scored by the untrained model on this CPU (seconds), and the model metrics every run logs. For
    settings that name metrics, checked before any cluster work. None when a task cannot score so
    few rows: its trials check the names themselves."""
    import torch

    from platform import objectives
    from platform.loop import numpy_outputs

    try:
        model = task.build_model(cfg).eval()
        batch = task.collate(shards_lib.head(val, 32), cfg, False)
        with torch.no_grad():
            outputs = numpy_outputs(task.eval_step(model, batch, cfg))
        return {f"val/{name}" for name in task.evaluate(outputs, cfg)} | set(objectives.MODEL_METRICS)
    except Exception:  # noqa: BLE001 - too few rows for the task's metrics (a class missing): the trials check
        return None


def data_and_settings(task, cfg):
    """(the task's splits, ``cfg`` with the settings its data decided as one more layer on top)."""
    splits, cfg, _ = built_data(task, cfg)
    return splits, cfg


def settled(cfg, shards: dict, runs: int = 1, driver_trains: bool = False):
    """``cfg`` with the numbers its ``auto`` scaling stands for (``cluster.settle_scaling``) for ``runs``
    trained at once, checked against the local machine now that it is known whether Ray Data reads.
    ``driver_trains``: a run in its own process trains in the command's (``platform.train``)."""
    reads = reads_with_ray_data(cfg, shards)
    layer = cluster.settle_scaling(cfg.scaling, cfg.ray.address, runs, reads, driver_trains)
    if layer:
        cfg = config_lib.build(cfg.task, [config_lib.flatten(config_lib.to_dict(cfg)), layer])
    cluster.check_fits(cfg.scaling, cfg.ray.address, reads)
    return cfg


def default_name(cfg) -> str:
    return f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_path(cfg) -> str:
    # $DEEPLENSE_RESULTS: a cluster's shared default (object storage, see cluster.yaml).
    path = (cfg.train.storage_path or os.environ.get("DEEPLENSE_RESULTS")
            or os.path.join(config_lib.output_dir(), "ray_results"))
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def put_in_memory(cfg, shards: dict, *, local: bool = False) -> dict:
    """Splits of at most ``data.in_memory_mb``, read once into Ray's object store: {split: ObjectRef}.
    ``local``: a run that trains in this very process without Ray (``without_ray``): {split: columns}.

    Every worker on a node then reads the same shared-memory copy (zero-copy numpy), and a run
    starts no Ray Data pipeline for them: no reading tasks and coordinators per trial and per
    epoch, which on small data cost more than the training. Larger splits stream through Ray
    Data. A sweep puts its splits once, for all its trials.
    """
    if local:
        return {split: shards_lib.in_memory(s) for split, s in training_splits(shards).items()}
    import ray

    return {split: ray.put(shards_lib.in_memory(s)) for split, s in training_splits(shards).items()
            if fits_in_memory(cfg, s)}


def without_ray(cfg, shards: dict) -> bool:
    """Whether ``platform.train`` runs with no Ray at all: one worker in the command's own process, on a
    machine of its own (no ``ray.address``, no running Ray), every split held in memory. Starting a
    local Ray costs seconds, and its background processes a tenth of a 2-core machine's training
    speed, for nothing such a run uses."""
    return (cluster.in_process(cfg.scaling) and not reads_with_ray_data(cfg, shards)
            and cluster.target_address(cfg.ray.address) is None)


def fits_in_memory(cfg, split) -> bool:
    return sum(f["bytes"] for f in split.manifest["files"]) <= cfg.data.in_memory_mb * 2**20


def reads_with_ray_data(cfg, shards: dict) -> bool:
    """Whether a run streams a split through Ray Data (whose read tasks need CPUs of their own)."""
    return not all(fits_in_memory(cfg, s) for s in training_splits(shards).values())


def training_splits(shards: dict) -> dict:
    """The splits a run trains and chooses on: train and val. Test is scored once, after (``score_test``)."""
    return {split: s for split, s in shards.items() if split != "test"}


def loop_config(cfg, shards: dict, *, mlflow_run_id: str | None, tracking_uri: str, in_memory: dict | None = None,
                started_at: float | None = None) -> dict:
    """What the training loop (``platform.loop``) gets, on every worker.

    ``in_memory``: splits already in the object store (``put_in_memory``); the others stream
    through Ray Data. ``started_at``: when the run (a sweep's trial) began, for
    ``time/to_first_step_s``; default now.
    """
    return {
        "cfg": config_lib.to_dict(cfg),
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
        "train_rows": shards["train"].num_rows,
        "image_shape": list(shards["train"].image_shape),  # (C, H, W)
        "in_memory": dict(in_memory or {}),
        "started_at": started_at or time.time(),  # start-up to the first step: time/to_first_step_s
    }


def streamed(shards: dict, in_memory: dict | None) -> dict:
    """Ray Datasets of the splits not held in the object store."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return {split: ray.data.read_parquet(s.files) for split, s in training_splits(shards).items()
            if split not in (in_memory or {})}


def make_trainer(cfg, shards: dict, *, name: str, mlflow_run_id: str | None, tracking_uri: str, callbacks=(),
                 in_memory: dict | None = None, started_at: float | None = None, resume_from=None):
    """A TorchTrainer for one run of ``cfg``: the one code path for a laptop and a GPU cluster.

    ``scaling.num_workers`` auto or 0: Ray Train's local mode, the loop in this process. See ``loop_config``
    for ``in_memory`` and ``started_at``. ``resume_from``: a checkpoint to start from, when the run
    called ``name`` has none of its own.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from platform.data.batches import EveryEvaluationRow
    from platform.loop import train_loop_per_worker

    scaling = cfg.scaling
    resources = {"CPU": cluster.cpus_of(scaling)}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config(cfg, shards, mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri,
                                         in_memory=in_memory, started_at=started_at), "start_from": resume_from},
        scaling_config=ScalingConfig(num_workers=0 if cluster.in_process(scaling) else scaling.num_workers,
                                     use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources, placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         max_preemption_failures=cfg.train.max_preemptions),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level=console.train_log_level()),
        ),
        datasets=streamed(shards, in_memory),
        dataset_config=EveryEvaluationRow(),
    )


def best_model(client, run_id: str, cfg, task):
    """The model of ``cfg`` with the run's best-epoch weights, on the CPU."""
    from platform import model_files, pretrained

    state = pretrained.load_state(pretrained.Source(run_id, run_id, None), client, setting="run")
    return model_files.build(task, cfg, state, f"the best weights of run {run_id}")


def log_best_model(client, run_id: str, cfg, task, shards: dict, register: bool, with_views: bool = False,
                   parent: str | None = None) -> tuple[str | None, dict]:
    """The run's best weights, kept: scored once on the test split (``test/<metric>`` on the run and
    on its sweep's ``parent``), then logged as an MLflow model (``model_files``: safetensors and the
    config, no pickle; registered under the task's name). Returns (the registered version, the test metrics).

    ``with_views``: also its Grad-CAM and embedding figures, which the training loop logs at a
    run's last epoch (a sweep's best trial may have been stopped before it).
    """
    import copy

    import torch

    from platform import explain

    model = best_model(client, run_id, cfg, task)
    metric = f"val/{task.threshold_metric}"
    at_best = {metric: runs.at_best_epoch(client, run_id, metric)} if task.threshold_metric else {}
    threshold = explain.decision_threshold(task, at_best)
    if with_views:
        # The rows the training loop chose at the run's end, read in the same order.
        views = explain.view_rows(cfg, cfg.plots.samples)
        rows = views.feed(shards_lib.batches(shards["val"], cfg.train.batch_size)).rows()
        _, why = explain.log_views(client, run_id, lambda: copy.deepcopy(model), task, cfg, rows, torch.device("cpu"),
                                   threshold)
        if why:
            print(f"warning: Grad-CAM / embedding figures of run {run_id} failed ({why})", file=sys.stderr)
    example = task.input_example(task.collate(shards_lib.head(shards["val"], 2), cfg, False))
    version = keep_model(client, run_id, model, cfg, example, task.name if register else None)
    try:  # the model is kept first: a failure on the test split loses its numbers, never the model
        test = score_test(client, run_id, model, task, cfg, shards["test"],
                          threshold if task.threshold_metric else None, parent)
    except Exception as error:
        print(f"warning: the test split of run {run_id} could not be scored ({type(error).__name__}: {error}); "
              f"score it with python -m platform.evaluate model={run_id}", file=sys.stderr)
        test = {}
    return version, test


def keep_model(client, run_id: str, model, cfg, example, register_as: str | None) -> str | None:
    """The run's model logged (and registered) once: a sweep whose driver was killed after
    registering it finds that version again rather than registering a second. The run keeps the
    time it ended (logging a model reopens it)."""
    earlier = [v for v in runs.model_versions(client, register_as) if v.run_id == run_id] if register_as else []
    if earlier:
        return earlier[0].version
    ended = client.get_run(run_id).info
    version = tracking.log_model(client, run_id, model, cfg, example, register_as)
    if ended.status != "RUNNING":
        tracking.end_run(client, run_id, ended.status, end_time=ended.end_time)
    return version


def score_test(client, run_id: str, model, task, cfg, test_shards, threshold: float | None,
               parent: str | None = None) -> dict:
    """The test split scored once with the best weights: ``test/<metric>`` on the run (and the
    sweep's parent), its plots under ``plots/test/`` and its per-image predictions."""
    import os
    import tempfile

    from platform import scoring

    objective = task.objective(cfg)
    earlier = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("test/")}
    if f"test/{objective}" in earlier:  # an extended sweep whose best trial was kept before: never scored twice
        if parent:
            tracking.log_metrics(client, parent, earlier, step=0)
        return earlier
    scored = scoring.score(model, task, cfg, test_shards, scoring.device_for(cfg.scaling.use_gpu), threshold)
    metrics = {f"test/{k}": v for k, v in scored.metrics.items()}
    for run in filter(None, (run_id, parent)):
        tracking.log_metrics(client, run, metrics, step=0)
    try:
        tracking.log_figures(client, run_id, scoring.figures(task, model, scored, cfg, threshold), "plots/test")
    except Exception as error:  # a figure is not worth the run's test numbers
        print(f"warning: the test plots of run {run_id} failed ({error})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="deeplense-test-") as folder:
        table = scoring.predictions(scored, list(cfg.data.classes))
        tracking.log_file(client, run_id, scoring.write_table(table, os.path.join(folder, "test.csv")),
                          scoring.PREDICTIONS)
    tracking.say(f"[{cfg.task}] test/{objective} = {scored.metrics.get(objective, float('nan')):.4f} "
                 f"({test_shards.num_rows} test images, scored once with the best val epoch's weights)")
    return metrics


def log_data(client, run_id: str, shards: dict) -> None:
    """The run's data: each split as an MLflow dataset (``log_datasets``), and the files in each split
    of real data (``data/<split>_files.txt``), so the split can be audited and reproduced; simulated
    splits are fixed by their logged seeds and sizes."""
    import pyarrow.parquet as pq

    from platform.data import FILE_COLUMN

    log_datasets(client, run_id, shards)
    for split, s in shards.items():
        if FILE_COLUMN in s.manifest.get("columns", []):
            files = pq.ParquetDataset(s.files).read(columns=[FILE_COLUMN]).column(FILE_COLUMN).to_pylist()
            tracking.log_text(client, run_id, "\n".join(files) + "\n", f"data/{split}_files.txt")


def log_datasets(client, run_id: str, shards: dict) -> None:
    """Each split as one of the run's MLflow dataset inputs (``mlflow.data``), so the UI's Datasets
    column says which data a model saw: the shards' folder as name and source, their content hash
    (its first 32 hex digits, MLflow's limit) as digest, their columns as schema, rows and image
    shape as profile, the split as context. Logging it again (a resumed run) adds nothing."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for split, s in shards.items():
        with warnings.catch_warnings():  # MLflow registers its local source twice, and says so each time
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(s.path)
        dataset = ShardsDataset(source, name=os.path.basename(s.path.rstrip("/")),
                                digest=s.manifest["content_hash"][:32], schema=mlflow_schema(shards_lib.schema(s)),
                                profile={"num_rows": s.num_rows, "image_shape": list(s.image_shape)})
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    client.log_inputs(run_id, datasets=inputs)


def mlflow_schema(arrow):
    """An MLflow schema of a Parquet schema (None stays None); a type MLflow has no name for is binary."""
    import pyarrow as pa
    from mlflow.types import ColSpec, DataType, Schema

    if arrow is None:
        return None
    kinds = [(pa.types.is_boolean, DataType.boolean), (pa.types.is_int32, DataType.integer),
             (pa.types.is_integer, DataType.long), (pa.types.is_float32, DataType.float),
             (pa.types.is_floating, DataType.double), (pa.types.is_string, DataType.string)]
    return Schema([ColSpec(next((kind for test, kind in kinds if test(f.type)), DataType.binary), f.name)
                   for f in arrow])


class ShardsDataset(MetaDataset):
    """A split's Parquet shards as MLflow sees them: metadata and a profile, never the rows."""

    def __init__(self, source, name: str, digest: str, schema, profile: dict):
        self._profile = profile
        super().__init__(source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}  # MetaDataset's leaves it out


def open_run(cfg, uri: str, name: str, tags: dict, connect: bool = True):
    """What train and tune do once the config and data are checked: Ray connected (unless not
    ``connect``), the MLflow run opened.

    Returns (client, experiment id, run id).
    """
    if connect:
        cluster.connect(cfg.ray.address)
    client = tracking.MlflowClient(uri)
    experiment = tracking.experiment_id(client, cfg.mlflow.experiment or f"deeplense-{cfg.task}")
    run_id = tracking.start_run(client, experiment, name, {tracking.TASK_TAG: cfg.task, **tags})
    provenance.record(client, run_id)  # the commit, the command line, the library versions
    return client, experiment, run_id
