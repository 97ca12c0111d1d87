"""Structured configuration: dataclasses, ``key=value`` overrides, strict validation.

Layers, last wins: the core defaults below, the task's config dataclass and its
``defaults``, the fixed values of the search space (sweeps only), then ``key=value``
arguments. OmegaConf does the typed merging; this module adds the checks OmegaConf
lacks (choices and ranges, kept as field metadata) and turns every failure into one
line that names the key, what was given and what would be right.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from platform import objectives, registry
from platform.objectives import PICK_RULES  # (inside TuneConfig, `objectives` is its field)
from platform.errors import ConfigError, shown  # noqa: F401 - config.ConfigError and config.shown, as callers use them


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 scalars for settings: ``no``, ``yes``, ``on``, ``off`` stay strings (``no`` is
    a DeepLense class name: ``data.classes=[no,sphere,vort]``), and ``1e-3`` is a float."""


_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in (_BOOL, _FLOAT, "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


MAX_YAML_VALUES = 100_000  # more than any settings or search-space file holds: aliases (*a) multiplying lists
MAX_YAML_DEPTH = 50


def load_yaml(text) -> Any:
    """Settings and search-space files: YAML with 1.2's booleans and floats."""
    try:
        value = yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML ({' '.join(str(error).split())})") from None
    except ValueError as error:  # an integer of over 4300 digits; a !!timestamp of a day that never was
        raise ConfigError(f"not valid YAML ({' '.join(str(error).split(':')[0].split())})") from None
    except RecursionError:
        raise ConfigError("not valid YAML (nested deeper than Python can read)") from None
    _check_size(value, [0], 0)
    return value


def _check_size(value, count: list, depth: int) -> None:
    # YAML aliases share one object between places: `&a [*a]` refers to itself and ten lists of ten
    # aliases of the one before are 10^10 values, which copying into a config would never finish.
    count[0] += 1
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels, or a value that holds itself (&a [*a])")
    if count[0] > MAX_YAML_VALUES:
        raise ConfigError(f"YAML of more than {MAX_YAML_VALUES} values (aliases *a repeating lists?)")
    for item in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()):
        _check_size(item, count, depth + 1)


def choice(default, options, **kw):
    return field(default=default, metadata={"choices": tuple(options)}, **kw)


def bounded(default, low=None, high=None, *, low_open=False, high_open=False, auto=False):
    """A number within a range; ``auto=True``: or the word ``auto`` (the platform chooses the number)."""
    return field(
        default=default,
        metadata={"range": (low, high, low_open, high_open), "auto": auto},
    )


AUTO = "auto"


# Seeds reach numpy and Optuna, which take 0 to 2**32 - 1; a run adds trial and epoch counts to its seed.
SEED_MAX = 2**31 - 1


# Names the platform finds its runs by (MLflow filter values) and names folders after (a sweep's
# Ray results): no quote, no space, no path, nothing a filter or a shell would read as syntax.
RUN_NAME = (re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"),
            "letters, digits and _ . - (at most 128, the first a letter or digit), e.g. mae-lr-sweep")
# An MLflow experiment's name: a hosted workspace's are paths (/Users/me/deeplense).
EXPERIMENT_NAME = (re.compile(r"[A-Za-z0-9/][A-Za-z0-9_.,:/ -]{0,254}"),
                   "letters, digits, spaces and _ . , : / - (at most 255), e.g. deeplense-mae")


def safe_name(pattern: tuple = RUN_NAME, default: str = ""):
    """A name checked against ``pattern`` (empty: the platform's default)."""
    return field(default=default, metadata={"pattern": pattern})


@dataclass
class DataConfig:
    source: str = choice("sim", ["sim", "folder"])
    path: Optional[str] = None  # a DeepLense folder (data.source=folder) or Parquet shards
    preset: str = "model_ii"  # simulator preset, see platform/data/simulate.py
    num_train: int = bounded(1024, 3)
    num_val: int = bounded(256, 3)
    num_test: Optional[int] = bounded(None, 3)  # simulated test rows; default: as num_val
    # Real data whose release holds out one split (the test split): the share of each class's
    # training files carved out, seeded by data.seed, for validation.
    val_fraction: float = bounded(0.1, 0.0, 1.0, low_open=True, high_open=True)
    # Real data with no held-out split at all (a folder of HR/LR pairs): the share held out for test.
    test_fraction: float = bounded(0.1, 0.0, 1.0, low_open=True, high_open=True)
    seed: int = bounded(0, 0, SEED_MAX)
    cache_dir: str = ""  # default: $DEEPLENSE_CACHE or ~/.cache/deeplense
    classes: list = field(default_factory=lambda: ["no", "sphere", "vort"])
    shard_size: int = bounded(2048, 1)
    # A split of at most this many MB (on disk) is read once into Ray's object store, one shared
    # copy per node, and reshuffled there each epoch; a larger one streams through Ray Data.
    in_memory_mb: float = bounded(1024.0, 0.0)


@dataclass
class TrainConfig:
    epochs: int = bounded(3, 1)
    batch_size: int = bounded(64, 1)
    lr: float = bounded(1e-3, 0.0, None, low_open=True)
    weight_decay: float = bounded(0.05, 0.0)
    optimizer: str = choice("adamw", ["adamw", "sgd"])
    schedule: str = choice("cosine", ["cosine", "constant"])
    warmup_epochs: int = bounded(0, 0)
    grad_clip: float = bounded(1.0, 0.0)  # 0 disables clipping
    precision: str = choice("auto", ["auto", "fp32", "bf16", "fp16"])
    # Image tensors' layout: channels_last lets a GPU's tensor cores run convolutions without
    # transposes; auto: channels_last on a GPU, PyTorch's default (contiguous) on the CPU.
    memory_format: str = choice("auto", ["auto", "channels_last", "contiguous"])
    seed: int = bounded(0, 0, SEED_MAX)
    # Restarts from the latest checkpoint after a lost worker or node (Ray Train), or after an error in
    # a trial that trains in its own process; -1: no limit. A timed-out trial is never restarted.
    max_failures: int = bounded(0, -1)
    max_preemptions: int = bounded(-1, -1)  # restarts after a node drained for preemption; -1: no limit
    preemption_check_steps: int = bounded(20, 0)  # steps between checks for SIGTERM / a drain notice; 0: none
    checkpoints_to_keep: int = bounded(2, 1)
    # Epochs between checkpoints. auto: an epoch's checkpoint is taken once the training since the
    # last one took at least ten times what that one cost (the first epoch's always), so writing
    # checkpoints costs a run at most about a tenth of its time: every epoch for a small model,
    # every few for ResNet-18's 180 MB on a small CPU run. A preemption notice checkpoints at once.
    checkpoint_every: Union[int, str] = bounded(AUTO, 1, auto=True)
    name: str = safe_name()  # `platform.train` run name; default: <task>-<date>-<time>
    compare_random_init: bool = False  # `platform.train` with init_from: also train from a random start, side by side
    storage_path: str = ""  # Ray checkpoints and results; default: $DEEPLENSE_RESULTS or ./ray_results (see output_dir)


@dataclass
class ScalingConfig:
    # auto: one worker that trains in the run's own process (a sweep reuses its trial processes from
    # trial to trial: seconds between trials, not half a minute). A number, even 1: Ray Train
    # workers (DDP over GPUs and nodes, a lost worker restarted); 0: the run's own process.
    num_workers: Union[int, str] = bounded(AUTO, 0, auto=True)
    use_gpu: bool = False
    # auto: on a machine of its own (a local Ray) a run gets all its CPUs, a sweep's trials share
    # them (each at least one); on a cluster 1. A worker trains with as many threads as CPUs.
    cpus_per_worker: Union[int, float, str] = bounded(AUTO, 0.0, None, low_open=True, auto=True)
    gpus_per_worker: float = bounded(1.0, 0.0, None, low_open=True)
    # How a run's workers sit on nodes (Ray placement groups): PACK fills a node first (fast
    # NCCL within a machine); SPREAD puts them on different nodes when it can.
    placement_strategy: str = choice("PACK", ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])


@dataclass
class TuneConfig:
    num_samples: int = bounded(4, 1)
    # asha stops poor trials early; pbt (population based training) has trials take the weights of
    # better ones and perturb their searched values every tune.perturbation_interval epochs.
    scheduler: str = choice("asha", ["asha", "none", "pbt"])
    # nsga2: Optuna's NSGA-II, for several tune.objectives (tpe handles several too: MOTPE).
    search: str = choice("tpe", ["tpe", "random", "nsga2"])
    max_concurrent: int = bounded(0, 0)  # 0: derived from the cluster's resources
    grace_period: int = bounded(1, 1)
    reduction_factor: int = bounded(2, 2)
    name: str = safe_name()  # default: <task>-<date>-<time>
    space: str = ""  # default: search_spaces/<task>.yaml
    seed: int = bounded(0, 0, SEED_MAX)
    # A sweep whose tune.name exists already: auto resumes it if unfinished (refuses a finished
    # one), never refuses it, force resumes it retrying failed trials, or adds tune.num_samples
    # trials to a finished one (it must exist).
    resume: str = choice("auto", ["auto", "never", "force"])
    # A trial still running after this many seconds is failed (a stalled one sends no reports
    # that a stopper could act on); 0: no limit.
    trial_timeout_s: float = bounded(0.0, 0.0)
    # How a trial ASHA stops early is told to Optuna: pruned (its per-epoch values kept; TPE ranks
    # it after the trials that ran to the end), or complete with its last value (Ray's default).
    stopped_trials: str = choice("pruned", ["pruned", "complete"])
    # Random trials before TPE models the results; 0: a third of tune.num_samples, from 2 to 10
    # (Optuna's own 10 would leave a default sweep of 4 trials all random).
    startup_trials: int = bounded(0, 0)
    # An earlier sweep of this task (its tune.name) to start from: its tune.warm_start_top best
    # configurations are tried first, then the search proposes its own. Keys this sweep's space no
    # longer searches, or values outside its ranges, are dropped with a note.
    warm_start: str = safe_name()
    warm_start_top: int = bounded(3, 1)
    # Several metrics optimised at once, each metric:max or metric:min (platform/objectives.py):
    # val/<a metric of the task>, model/params or model/images_per_s; none: the task's own val metric.
    objectives: list = field(default_factory=list, metadata={"check": "objectives"})
    # Bounds a kept model must meet, each metric<=number or metric>=number (model/params<=5e6).
    constraints: list = field(default_factory=list, metadata={"check": "objectives"})
    # Which trial of a Pareto front (several objectives) is registered: first (best on the first
    # objective) or knee (nearest the ideal point, each objective scaled over the front).
    pick: str = choice("first", list(PICK_RULES))
    # tune.scheduler=pbt: epochs between exploits (a trial in the worst quarter takes a top quarter
    # trial's weights and perturbs its values); each of those epochs is checkpointed.
    perturbation_interval: int = bounded(2, 1)


@dataclass
class PlotsConfig:
    # Of the best weights, at the end of a run, over plots.samples validation images balanced over
    # the classes (explain.ViewRows):
    gradcam: bool = True  # Grad-CAM heatmaps, correct and misclassified images of each class (classifiers)
    embeddings: bool = True  # a t-SNE map of the encoder's features (tasks with an encoder)
    samples: int = bounded(256, 8)
    gradcam_per_class: int = bounded(3, 1)  # images of each class, correct ones and misclassified ones


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = safe_name(EXPERIMENT_NAME)  # default: deeplense-<task>
    register_model: bool = True
    # How long a run trains on while its tracking server does not answer, its records kept and
    # delivered when it is back; past this the run fails with the reason (the sweep resumes).
    outage_limit_s: float = bounded(600.0, 0.0, low_open=True)
    # Seconds between samples of MLflow's system metrics on each run that trains (system/...: CPU,
    # memory, and the utilisation and memory of the GPUs the run was given); 0: none.
    system_metrics_s: float = bounded(10.0, 0.0)


@dataclass
class CostConfig:
    # USD per node-hour by node type (cost.hourly.gpu_spot=0.45): a sweep's estimated cost. A type
    # without one is priced by its instance type and market (platform/cost.py: LIST_PRICES).
    hourly: Dict[str, float] = field(default_factory=dict)


@dataclass
class LogConfig:
    # info: the config, Tune's trial table, a line per epoch, the summary; debug (or -v): also every
    # line Ray, MLflow and Optuna log (platform/console.py).
    level: str = choice("info", ["info", "debug"])


@dataclass
class AdaptConfig:
    # Domain adaptation of a classifier to unlabelled target images (platform/adapt.py).
    path: Optional[str] = None  # a folder of the target domain's images: every .npy below it, never labelled
    method: str = choice("none", ["none", "dann", "coral"])
    # DANN: the gradient reversal's strength at the end of Ganin et al.'s ramp; CORAL: the loss's weight.
    weight: float = bounded(1.0, 0.0)


@dataclass
class RayConfig:
    address: str = ""  # default: $RAY_ADDRESS, a running local Ray, or a new local Ray


CORE_SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "scaling": ScalingConfig,
    "tune": TuneConfig,
    "plots": PlotsConfig,
    "mlflow": MlflowConfig,
    "ray": RayConfig,
    "cost": CostConfig,
    "log": LogConfig,
    "adapt": AdaptConfig,
}

_SCHEMAS: dict[str, type] = {}


def schema_for(task: registry.Task) -> type:
    """The config dataclass of one task: ``task``, the core sections and the task's own."""
    if task.name not in _SCHEMAS:
        fields = [("task", str, field(default=task.name))]
        fields += [(n, t, field(default_factory=t)) for n, t in CORE_SECTIONS.items()]
        hints = typing.get_type_hints(task.config)  # real types, also under `from __future__ import annotations`
        for f in dataclasses.fields(task.config):
            if f.name in CORE_SECTIONS or f.name == "task":
                raise ValueError(f"task {task.name!r}: config field {f.name!r} clashes with a core section")
            fields.append((f.name, hints[f.name], f))
        _SCHEMAS[task.name] = dataclasses.make_dataclass(f"{task.name.title()}RunConfig", fields)
    return _SCHEMAS[task.name]


def _known_keys(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    keys = {}
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        keys[key] = f
        sub = _field_type(f)
        if dataclasses.is_dataclass(sub):
            keys.update(_known_keys(sub, key + "."))
    return keys


def _field_type(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
        return f.default_factory
    return f.type if isinstance(f.type, type) else None


def is_value_key(schema: type, key: str) -> bool:
    keys = _known_keys(schema)
    if key in keys:
        return not dataclasses.is_dataclass(_field_type(keys[key]))
    mapping, _, name = key.rpartition(".")  # an entry of a mapping (cost.hourly.gpu_spot)
    return bool(name) and mapping in keys and keys[mapping].default_factory is dict


def check_key(schema: type, key: str) -> None:
    if is_value_key(schema, key):
        return
    keys = _known_keys(schema)
    if key in keys:
        raise ConfigError(f"{key} is a section, not a value; set one of its keys, e.g. {key}.{dataclasses.fields(_field_type(keys[key]))[0].name}=...")
    leaves = [k for k, f in keys.items() if not dataclasses.is_dataclass(_field_type(f))]
    close = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
    section = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in leaves if section and k.startswith(section + ".")]
    hint = f"did you mean {close[0]!r}? " if close else ""
    known = f"known keys under {section}: {', '.join(siblings)}" if siblings else "run with --help to list the keys"
    raise ConfigError(f"unknown config key {key!r}; {hint}{known}")


def _validate(node: DictConfig, prefix: str = "") -> None:
    # The merged values, checked before OmegaConf builds the dataclasses: a task's own checks in its
    # __post_init__ then see every value within its range (no `embed_dim % num_heads` with num_heads=0).
    for f in dataclasses.fields(OmegaConf.get_type(node)):
        key, value = prefix + f.name, node[f.name]
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            _validate(value, key + ".")
            continue
        if isinstance(value, DictConfig):  # a mapping of numbers (cost.hourly): each finite and not negative
            for name, number in value.items():
                if isinstance(number, float) and not 0 <= number < math.inf:
                    raise ConfigError(f"{key}.{name}={number} is out of range; expected a finite number >= 0")
            continue
        if f.metadata.get("check") == "objectives":  # tune.objectives, tune.constraints: their own syntax
            objectives.check(key, list(value))
            continue
        if isinstance(value, float) and value != value:
            raise ConfigError(f"{key}={value} is not a number")
        if isinstance(value, float) and value in (math.inf, -math.inf):
            raise ConfigError(f"{key}={value} is not a finite number")
        if "pattern" in f.metadata and value and not f.metadata["pattern"][0].fullmatch(value):
            raise ConfigError(f"{key}={shown(value)} is not a name the platform can use; use "
                              f"{f.metadata['pattern'][1]}")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            options = "|".join(str(o) for o in f.metadata["choices"])
            raise ConfigError(f"{key}={shown(value)} is not allowed; expected one of {options}")
        if f.metadata.get("auto") and isinstance(value, str):
            if value != AUTO:
                low = f.metadata["range"][0]
                raise ConfigError(f"{key}={shown(value)} is not allowed; expected auto or a number "
                                  f"{'>' if f.metadata['range'][2] else '>='} {low:g}")
            continue
        if "range" in f.metadata and value is not None:
            low, high, low_open, high_open = f.metadata["range"]
            too_low = low is not None and (value <= low if low_open else value < low)
            too_high = high is not None and (value >= high if high_open else value > high)
            if too_low or too_high:
                left = "" if low is None else f"{low} {'<' if low_open else '<='} "
                right = "" if high is None else f" {'<' if high_open else '<='} {high}"
                raise ConfigError(f"{key}={shown(value)} is out of range; expected {left}{key}{right}")


def _one_line(error: Exception, key: str, value: Any) -> ConfigError:
    reason = (str(error).splitlines() or [type(error).__name__])[0].strip()
    if "type hint 'Union[int, str]'" in reason:  # a count or auto (scaling.num_workers)
        return ConfigError(f"{key}={shown(value)} is not allowed; expected auto or a whole number")
    if "is not a ListConfig" in reason:
        return ConfigError(f"{key}={shown(value)} is not allowed; expected a list in brackets, e.g. {key}=[{shown(value)}]")
    if "type hint 'Union[" in reason:
        return ConfigError(f"{key}={shown(value)} is not allowed; expected auto or a number")
    return ConfigError(f"{key}={shown(value)}: {reason}")


def build(task_name: str, layers: list[dict[str, Any]]) -> Any:
    """A validated config object for ``task_name`` with ``layers`` of dotted overrides applied in order."""
    task = registry.get(task_name)
    cfg = build_from(schema_for(task), [task.defaults, *layers], task_name)
    chosen = registry.task_of(cfg)  # of several registrations, the one the settings choose, with its defaults
    return cfg if chosen is task else build_from(schema_for(chosen), [chosen.defaults, *layers], task_name)


def build_from(schema: type, layers: list[dict[str, Any]], task_name: str | None = None) -> Any:
    """A validated ``schema`` object with ``layers`` of dotted overrides applied in order: the
    same strictness for a command's config that is not a task's (``platform.report``)."""
    conf = OmegaConf.structured(schema)
    for layer in layers:
        for key, value in layer.items():
            if key == "task" and task_name is not None:
                if value != task_name:
                    raise ConfigError(f"task={value} conflicts with task={task_name}")
                continue
            check_key(schema, key)
            if "${" in str(value):
                # OmegaConf would resolve it (an environment variable into a run name) on the driver and
                # again, differently, on each worker: settings are plain values.
                raise ConfigError(f"{key}={shown(value)}: '${{' starts an OmegaConf interpolation, which settings "
                                  f"do not take; write the value itself")
            try:
                OmegaConf.update(conf, key, value, merge=True)
            except (OmegaConfBaseException, OverflowError) as error:  # OverflowError: an integer past float's range
                raise _one_line(error, key, value) from None
    try:
        _validate(conf)
        obj = OmegaConf.to_object(conf)
    except (OmegaConfBaseException, OverflowError) as error:
        raise ConfigError((str(error).splitlines() or [type(error).__name__])[0]) from None
    return obj


def from_param(text: str) -> Any:
    """A config value back from the text MLflow kept of it as a param: None was logged as "None"
    (which YAML 1.2 would read as a string), "" stays "", the rest is YAML."""
    if text == "None":
        return None
    return load_yaml(text) if text != "" else ""


def parse_cli(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """``["task=mae", "train.epochs=5"]`` -> ("mae", {"train.epochs": 5}); values typed as YAML."""
    overrides: dict[str, Any] = {}
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"expected key=value, got {arg!r} (e.g. task=mae train.epochs=5)")
        key, raw = arg.split("=", 1)
        try:
            overrides[key.strip()] = load_yaml(raw) if raw.strip() else ""
        except ConfigError as error:
            raise ConfigError(f"{shown(arg)}: {error}") from None
    task_name = overrides.pop("task", "classification")
    return str(task_name), overrides


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Any:
    """Rebuild (and re-validate) a config sent to a Ray worker as a plain dict."""
    return build(data["task"], [flatten(data)])


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def to_yaml(cfg: Any) -> str:
    """The config as YAML for people and artifacts: secrets masked (``platform.masking``)."""
    from platform.masking import redacted

    return OmegaConf.to_yaml(OmegaConf.create(redacted(to_dict(cfg))))


def under_ray_job() -> bool:
    """True in the driver of a `ray job submit` (and its workers)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def output_dir() -> str:
    """Where the default MLflow store and Ray results go: the directory the command runs from.

    Under `ray job submit` that directory is Ray's temporary copy of the working dir, deleted
    with the job's files; there it is $DEEPLENSE_HOME, or ~/deeplense on the head node.
    """
    if under_ray_job():
        return os.path.abspath(os.path.expanduser(os.environ.get("DEEPLENSE_HOME") or "~/deeplense"))
    return os.getcwd()


def cache_dir(cfg: Any) -> str:
    # Absolute: Ray workers read the shards from their own working directories. A URI
    # (s3://bucket/deeplense) is object storage every node can read.
    path = cfg.data.cache_dir or os.environ.get("DEEPLENSE_CACHE") or "~/.cache/deeplense"
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))
