"""``python -m platform.train task=classification train.epochs=5``: one Ray Train run, one MLflow run.

The same path a sweep takes for each of its trials, without Tune. With one worker (the default) on
a machine of its own it trains in this process with no Ray at all (``runner.without_ray``).
"""

from __future__ import annotations

from platform import adapt, cli, cluster, console, pretrained, provenance, registry, tracking
from platform import config as config_lib
from platform.runner import (built_data, default_name, log_best_model, log_data, make_trainer, open_run,
                             put_in_memory, settled, without_ray)


def main(argv: list[str]) -> int:
    task_name, overrides = config_lib.parse_cli(argv)
    uri = tracking.tracking_uri(str(overrides.get("mlflow.tracking_uri", "")))
    given_task = task_name if any(a.startswith("task=") for a in argv) else None
    recorded_task, recorded = provenance.from_run(overrides, uri, given_task)
    task_name = recorded_task or task_name
    overrides = {**recorded, **overrides}
    cfg = config_lib.build(task_name, [overrides])
    console.quiet(cfg.log.level)
    task = registry.task_of(cfg)
    adapt.check(task, cfg)
    cluster.check_fits(cfg.scaling, cfg.ray.address)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    source = pretrained.source_for(cfg, uri)  # init_from checked before any work; linked in MLflow
    if cfg.train.compare_random_init and source is None:
        raise config_lib.ConfigError("train.compare_random_init=true compares a pretrained start with a random one; "
                                     "set init_from= (a run id, models:/<name>/<version|latest> or a checkpoint)")
    inherited = pretrained.inherited(task, source, uri, given=set(overrides))
    if inherited:
        cfg = config_lib.build(task_name, [inherited, overrides])
        task = registry.task_of(cfg)
        print(pretrained.describe_inherited(inherited, source))
    shards, cfg, data_tags = built_data(task, cfg)
    cfg = settled(cfg, shards, driver_trains=True)
    print(config_lib.to_yaml(cfg), flush=True)

    name = cfg.train.name or default_name(cfg)
    if cfg.train.compare_random_init:
        return compare_with_random_init(cfg, task, shards, uri, name, source)
    client, experiment, run_id = open_run(cfg, uri, name, {**(source.tags() if source else {}), **data_tags},
                                          connect=not without_ray(cfg, shards))
    with cli.ends_run(client, run_id):
        value, version = train_and_log(cfg, task, shards, client, run_id, uri, name, cfg.mlflow.register_model)
        print(f"\nbest val/{task.objective(cfg)} = {value:.4f}   MLflow run {run_id}"
              + (f"   registered model {task.name} version {version}" if version else ""))
        print(cli.ui_hint(uri, experiment, run_id))
    return 0


def train_and_log(cfg, task, shards, client, run_id: str, uri: str, name: str, register: bool,
                  in_memory: dict | None = None) -> tuple[float, str | None]:
    """One Train run into the MLflow run ``run_id``: params, config, per-epoch metrics, the best model.

    ``in_memory``: the splits already in the object store; default: put them there now.
    """
    tracking.log_params(client, run_id, config_lib.flatten(config_lib.to_dict(cfg)))
    tracking.log_text(client, run_id, config_lib.to_yaml(cfg), "config.yaml")
    log_data(client, run_id, shards)
    if in_memory is None:
        in_memory = put_in_memory(cfg, shards, local=without_ray(cfg, shards))
    result = make_trainer(cfg, shards, name=name, mlflow_run_id=run_id, tracking_uri=uri, in_memory=in_memory).fit()
    if result.error:
        raise result.error
    version, _ = log_best_model(client, run_id, cfg, task, shards, register)
    # As the run logged it: Ray's result holds only what came with a checkpoint (train.checkpoint_every).
    return client.get_run(run_id).data.metrics.get(f"best/{task.objective(cfg)}"), version


def compare_with_random_init(cfg, task, shards, uri: str, name: str, source) -> int:
    """The same training twice, from the pretrained weights and from a random start, side by side in MLflow.

    Same data, seed, epochs and schedule: the only difference is the start (plus the task's
    ``random_init`` settings, e.g. an encoder that would be frozen is trained, since a frozen
    random encoder is no baseline). Both runs nest under one parent that holds the comparison.
    """
    from platform.plots import curves_figure

    baseline = config_lib.build(task.name, [config_lib.flatten(config_lib.to_dict(cfg)),
                                            {"init_from": "", **task.random_init}])
    objective, metric = task.objective(cfg), f"val/{task.objective(cfg)}"
    local = without_ray(cfg, shards)
    client, experiment, parent = open_run(cfg, uri, name, {tracking.KIND_TAG: "comparison", **source.tags()},
                                          connect=not local)
    with cli.ends_run(client, parent):
        tracking.log_params(client, parent, config_lib.flatten(config_lib.to_dict(cfg)))
        best, runs = {}, {}
        in_memory = put_in_memory(cfg, shards, local=local)  # the same data for both runs, read once
        for label, run_cfg, tags in (("pretrained", cfg, source.tags()), ("random_init", baseline, {})):
            runs[label] = tracking.start_run(client, experiment, f"{name}-{label}",
                                             {tracking.TASK_TAG: cfg.task, "platform.init": label, **tags}, parent)
            with cli.ends_run(client, runs[label]):
                register = cfg.mlflow.register_model and label == "pretrained"
                best[label], _ = train_and_log(run_cfg, task, shards, client, runs[label], uri, f"{name}-{label}",
                                               register, in_memory)
        histories = {label: [(m.step, m.value) for m in client.get_metric_history(run, metric)]
                     for label, run in runs.items()}
        tracking.log_metrics(client, parent, {f"{label}/best_{objective}": v for label, v in best.items()}, step=0)
        tracking.log_figures(client, parent, {"pretrained_vs_random_init.png": curves_figure(histories, metric)})
        tracking.set_tags(client, parent, {f"platform.{label}_run_id": run for label, run in runs.items()})
        print(f"\nbest {metric}: " + "   ".join(f"{label} {v:.4f} (run {runs[label]})" for label, v in best.items()))
        print(cli.ui_hint(uri, experiment, parent))
    return 0


if __name__ == "__main__":
    cli.exit_with(main)
