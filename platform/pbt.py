"""Population based training: ``python -m platform.tune task=diffusion tune.scheduler=pbt``.

Ray Tune's ``PopulationBasedTraining`` over the search space: a first population drawn at random
(``tune.seed``), then every ``tune.perturbation_interval`` epochs each trial in the bottom quarter
of the population on ``val/<task metric>`` takes the weights of one in the top quarter (its latest
checkpoint: those epochs are always checkpointed) and goes on with that trial's values perturbed:
a number times 0.8 or 1.2, or drawn afresh one time in four, kept within the space's range; a
choice moved to a neighbouring option. A key whose value shapes the model (its weights would not
load with another) is drawn once and then travels with the weights.

Each exploit is recorded on the exploited trial's MLflow run, so its lineage can be followed in
the UI: ``platform.pbt.lineage`` (each exploit: the epoch, whose weights, the values changed),
``platform.pbt.exploited_from`` (the latest one's trial), ``platform.pbt.exploits`` (how many), and
the history of each searched value as the metric ``pbt/<key>`` at the epoch it took effect (a
choice as the index of its option). MLflow params never change: they stay the values the trial
started with.
"""

from __future__ import annotations

import functools
import json
import sys

from ray.tune.schedulers import PopulationBasedTraining

from platform import config as config_lib
from platform import runs, tracking

LINEAGE_TAG = "platform.pbt.lineage"
DONOR_TAG = "platform.pbt.exploited_from"
EXPLOITS_TAG = "platform.pbt.exploits"
VALUE_METRIC = "pbt/"  # pbt/<key>: a searched key's value from the epoch it took effect
MAX_LINEAGE_CHARS = 7000  # MLflow keeps 8000 characters of a tag; the oldest exploits go first


def check(cfg, task, space) -> None:
    """What PBT cannot do, refused before any work (one line each)."""
    from platform.config import ConfigError

    if cfg.tune.scheduler != "pbt":
        return
    conditional = [key for key, param in space.params.items() if param.when]
    if conditional:
        raise ConfigError(f"tune.scheduler=pbt perturbs the values a trial runs with, and {conditional[0]} is searched "
                          f"only under a condition; use a space without when: (or tune.scheduler=asha)")
    if len(cfg.tune.objectives) > 1 or cfg.tune.constraints:
        raise ConfigError("tune.scheduler=pbt ranks its population on one metric; tune.objectives with several "
                          "metrics and tune.constraints need tune.scheduler=asha or none")
    if cfg.tune.search == "nsga2":
        raise ConfigError("tune.scheduler=pbt draws its first population at random; tune.search=nsga2 is for several "
                          "objectives with tune.scheduler=asha or none")
    if cfg.tune.perturbation_interval >= cfg.train.epochs:
        raise ConfigError(f"tune.perturbation_interval={cfg.tune.perturbation_interval} leaves no exploit within "
                          f"train.epochs={cfg.train.epochs}; expected fewer epochs between exploits than the trials "
                          f"train")
    if not space.params:
        raise ConfigError("tune.scheduler=pbt needs a searched key to perturb; the search space has none")


def domain(param):
    """A space's entry as Ray Tune's sampling domain."""
    from ray import tune

    low_high = param.args
    if param.kind == "uniform":
        return tune.uniform(*low_high)
    if param.kind == "loguniform":
        return tune.loguniform(*low_high)
    if param.kind == "int":
        return tune.randint(low_high[0], low_high[1] + 1)  # randint's upper bound is exclusive
    return tune.choice(list(param.args))


def first_population(space, seed: int, starts: list[dict]):
    """(searcher, param_space): the first values of each trial, at random from the space (a warm
    start's configurations first)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = BasicVariantGenerator(points_to_evaluate=list(starts) or None, random_state=seed)
    return search, {key: domain(param) for key, param in space.params.items()}


def shapes_model(task, cfg, key: str, param) -> bool:
    """Whether ``key``'s values give models of different weight shapes (or one fails to build)."""
    values = param.args if param.kind == "choice" else param.args[:2]
    shapes = set()
    for value in values:
        try:
            model = task.build_model(config_lib.build(task.name, [config_lib.flatten(config_lib.to_dict(cfg)),
                                                                 {key: value}]))
        except Exception:  # noqa: BLE001 - a value the rest of the config does not take: not perturbed
            return True
        shapes.add(tuple((name, tuple(t.shape)) for name, t in model.state_dict().items()))
    return len(shapes) > 1


def _within_space(config: dict, bounds: dict) -> dict:
    """A perturbed config with each number back inside its range (0.8x or 1.2x may leave it)."""
    for key, (low, high, whole) in bounds.items():
        if key in config:
            value = min(max(config[key], low), high)
            config[key] = int(round(value)) if whole else value
    return config


class LineagePBT(PopulationBasedTraining):
    """``PopulationBasedTraining`` that writes each exploit on the exploited trial's MLflow run."""

    def __init__(self, cfg, space, task, *, uri: str, experiment: str, sweep: str):
        mutable = {key: param for key, param in space.params.items() if not shapes_model(task, cfg, key, param)}
        fixed = sorted(set(space.params) - set(mutable))
        if fixed:
            print(f"pbt: {', '.join(fixed)} {'shapes' if len(fixed) == 1 else 'shape'} the model: drawn once, then "
                  f"inherited with the weights", flush=True)
        bounds = {key: (p.args[0], p.args[1], p.kind == "int") for key, p in mutable.items() if p.kind != "choice"}
        super().__init__(
            time_attr="epoch", metric=f"val/{task.objective(cfg)}", mode=task.mode,
            perturbation_interval=cfg.tune.perturbation_interval,
            hyperparam_mutations={key: list(p.args) if p.kind == "choice" else domain(p) for key, p in mutable.items()},
            custom_explore_fn=functools.partial(_within_space, bounds=bounds))
        self.space = dict(space.params)
        self.uri, self.experiment, self.sweep, self.epochs = uri, experiment, sweep, cfg.train.epochs

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("epoch", 0) >= self.epochs:
            return self.CONTINUE  # its last epoch: no training left to do with another trial's weights
        return super().on_trial_result(tune_controller, trial, result)

    def _exploit(self, tune_controller, trial, trial_to_clone):
        epoch = int(self._trial_state[trial_to_clone].last_result.get("epoch", 0))  # its checkpoint's
        own_epoch = int(self._trial_state[trial].last_result.get("epoch", 0))  # (trial.last_result lags)
        super()._exploit(tune_controller, trial, trial_to_clone)
        try:
            record_exploit(tracking.MlflowClient(self.uri), self.experiment, self.sweep, trial.trial_id,
                           trial_to_clone.trial_id, epoch, own_epoch, dict(trial.config), self.space)
        except Exception as error:  # noqa: BLE001 - the record must not stop the sweep
            print(f"warning: PBT lineage of trial {trial.trial_id} not recorded: {tracking._one_line(error)}",
                  file=sys.stderr)


def value_metrics(values: dict, space: dict) -> dict:
    """{``pbt/<key>``: number} of the values of ``space``'s keys (``space.Param``s), a choice as its option's index."""
    numbers = {}
    for key, value in values.items():
        if key not in space:
            continue
        kind, args = space[key].kind, space[key].args
        if kind == "choice":
            numbers[VALUE_METRIC + key] = float(args.index(value)) if value in args else float("nan")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[VALUE_METRIC + key] = float(value)
    return numbers


def record_exploit(client, experiment: str, sweep: str, trial_id: str, donor_id: str, epoch: int, own_epoch: int,
                   after: dict, space: dict) -> None:
    """Trial ``trial_id`` took the weights trial ``donor_id`` had at ``epoch``, with values ``after``."""
    run_id = runs.find_run(client, experiment, {tracking.SWEEP_TAG: sweep, tracking.TRIAL_TAG: trial_id})
    if run_id is None:
        return
    tags = client.get_run(run_id).data.tags
    lineage = json.loads(tags.get(LINEAGE_TAG, "[]"))
    values = {key: after[key] for key in space if key in after}
    lineage.append({"epoch": epoch, "at_own_epoch": own_epoch, "weights_of": donor_id, "values": values})
    while len(json.dumps(lineage)) > MAX_LINEAGE_CHARS and len(lineage) > 1:
        lineage.pop(0)
    tracking.set_tags(client, run_id, {LINEAGE_TAG: json.dumps(lineage), DONOR_TAG: donor_id,
                                       EXPLOITS_TAG: int(tags.get(EXPLOITS_TAG, "0")) + 1})
    tracking.log_metrics(client, run_id, value_metrics(after, space), step=epoch)
    print(f"pbt: trial {trial_id} (epoch {own_epoch}) takes the weights of trial {donor_id} (epoch {epoch}) with "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()), flush=True)
