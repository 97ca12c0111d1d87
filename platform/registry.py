"""Tasks: a name-to-record map, filled by importing task modules.

A task file in ``tasks/`` ends with ``register(Task(...))``; importing it is registering
it. A package outside this repository adds tasks through the ``deeplense_platform.tasks``
entry-point group: each entry point names a module (or a callable) that registers its
tasks when loaded, exactly like a file in ``tasks/``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

ENTRY_POINT_GROUP = "deeplense_platform.tasks"


class UnknownTaskError(LookupError):
    pass


class DuplicateTaskError(UnknownTaskError):
    """Two modules register a task of the same name: which one a command would get is not for chance to decide."""


@dataclass(frozen=True)
class Task:
    """Everything the core needs to train, evaluate and tune one lensing task.

    name          the value of ``task=`` on the command line
    config        a dataclass whose fields become top-level config sections (``model``, ...)
    build_model   cfg -> nn.Module
    build_data    cfg -> {"train": Shards, "val": Shards, "test": Shards}, or (those splits, {dotted key: value}):
                  the settings the data decided (a class weight from the label counts, statistics
                  to normalise by), which the core applies as one more config layer, so they are
                  validated, printed, logged and compared on resume like any other setting. Never
                  writes into ``cfg``. Runs on the driver before any Ray work
    collate       (numpy batch of Parquet columns, cfg, training) -> dict of tensors
    train_step    (model, batch, cfg) -> {"loss": tensor, ...}; the loop does backward. The loop adds
                  ``batch["epoch"]`` (0-based) for losses with a schedule
    eval_step     (model, batch, cfg) -> dict of per-sample tensors, gathered over the split
    evaluate      (gathered numpy outputs, cfg) -> {"metric name": float}
    metric, mode  what the sweep optimises, logged as ``val/<metric>``; "max" or "min". ``metric``
                  may be a function of the config when a setting decides it (a choice of head)
    plots         (best model, one collated val batch on its device, gathered outputs of the best
                  epoch, cfg) -> {"file.png": matplotlib Figure}; called once, by rank 0, at the end
    defaults      overrides of core keys for this task, e.g. {"train.lr": 3e-4}
    input_example collated val batch -> the numpy input the logged MLflow model is called with
    search_space  path of the default search-space YAML (a plugin ships its own); None means
                  search_spaces/<name>.yaml in this repository
    init_weights  (model, pretrained state dict, cfg) -> names left as initialised; called when
                  the task's config has ``init_from`` set (default: every matching name and shape)
    after_step    (model, cfg) -> None, after every optimizer step, on every worker, with the
                  model unwrapped from DDP: weight averages (EMA) and the like
    find_unused_parameters  True when some trainable parameters get no gradient in some steps
                  (an encoder frozen for a warm-up): DDP must then look for them
    gradcam       (model, cfg) -> ``platform.explain.GradCamTarget`` (the classifier and its target
                  layer) or None: Grad-CAM heatmaps of the run's best model (``plots.gradcam``)
    class_head    (model) -> the module that turns the features into class logits (a classifier's
                  last linear layer): domain adaptation (``adapt.method``, platform/adapt.py) aligns its
                  input (B, D) between the training images and a target domain's. None: no adaptation
    embed         (model, collated batch, cfg) -> features (B, D) of the task's encoder: a t-SNE map
                  of the validation images (``plots.embeddings``), coloured by the data column
                  ``embedding_colour`` (``label``: the class; or a truth parameter, ``theta_e``)
    threshold_metric  a binary finder's: the metric (logged as ``val/<it>``) that holds the decision
                  threshold chosen on the val split; the views mark as lenses the images above the one
                  of the best epoch (else 0.5). Its ``evaluate`` and ``plots`` then take ``threshold=``:
                  the test split and other data are scored at the one chosen on val
    references    what the DeepLense community published for this task, shown beside the best runs
                  by ``python -m platform.report``: ``platform.report.Reference`` records
    predict       (model, images (B, C, H, W) on the model's device, cfg) -> {column: per-image
                  values}: what ``platform.predict`` writes for unlabelled images (class
                  probabilities, a lens score, parameters in their units; an (N, C, H, W) value is
                  written as one .npy file per image). A finder's takes ``threshold=`` too
    when          (dotted key, value) for one of several registrations under one name, each serving
                  the configs with that setting: ``task=mae_finetune head=superres`` is the
                  ``when=("head", "superres")`` one. All of a name's registrations share ``config``;
                  the one for the key's default value answers ``get(name)``
    """

    name: str
    config: type
    build_model: Callable[..., Any]
    build_data: Callable[..., Any]
    collate: Callable[..., Any]
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    evaluate: Callable[..., Any]
    metric: str | Callable[[Any], str]
    mode: str
    input_example: Callable[..., Any] = lambda batch: batch["image"][:2].numpy()
    plots: Optional[Callable[..., Any]] = None
    defaults: dict = field(default_factory=dict)
    search_space: Optional[str] = None  # path of the default search space; None: search_spaces/<name>.yaml
    init_weights: Optional[Callable[..., Any]] = None
    after_step: Optional[Callable[..., Any]] = None
    find_unused_parameters: bool = False
    # Config key prefixes taken from the init_from run's logged parameters unless set here:
    # {"model.": "model."} makes a fine-tuning run's encoder the size the pretraining run's was.
    inherit: dict = field(default_factory=dict)
    # Settings of the random-initialisation baseline (train.compare_random_init) beyond clearing
    # init_from: {"encoder.freeze": False}, since a frozen random encoder is no baseline.
    random_init: dict = field(default_factory=dict)
    gradcam: Optional[Callable[..., Any]] = None
    class_head: Optional[Callable[..., Any]] = None
    embed: Optional[Callable[..., Any]] = None
    embedding_colour: str = "label"
    references: tuple = ()
    threshold_metric: Optional[str] = None
    predict: Optional[Callable[..., Any]] = None
    when: Optional[tuple[str, Any]] = None
    description: str = ""

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"task {self.name!r}: mode must be 'min' or 'max', got {self.mode!r}")

    def objective(self, cfg) -> str:
        """The name of the metric this config's runs optimise."""
        return self.metric(cfg) if callable(self.metric) else self.metric


_TASKS: dict[str, list[Task]] = {}  # name -> its registrations (several when each serves one value of a setting)
_SOURCES: dict[str, str] = {}  # task name -> the module that registered it
_discovered = False


def register(task: Task) -> Task:
    """Add ``task`` under its name; a name another module registered already is a one-line error."""
    source = sys._getframe(1).f_globals.get("__name__", "?")
    if task.name in _TASKS and _SOURCES[task.name] != source:
        raise DuplicateTaskError(f"task {task.name!r} is registered by both {_SOURCES[task.name]} and {source}; "
                                 f"rename one of them (Task(name=...))")
    others = [t for t in _TASKS.get(task.name, []) if t.when != task.when]  # a reloaded module replaces its own
    if others and (task.when is None or any(t.when is None or t.when[0] != task.when[0] or t.config is not task.config
                                            for t in others)):
        raise DuplicateTaskError(f"task {task.name!r} is registered twice by {source}; several registrations of one "
                                 f"name need when=(key, value) with the same key and the same config class")
    _TASKS[task.name], _SOURCES[task.name] = others + [task], source
    return task


def _setting(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _pick(name: str, settings: Any) -> Task:
    """The registration of ``name`` whose ``when`` matches ``settings`` (a config object)."""
    candidates = _TASKS[name]
    if len(candidates) == 1:
        return candidates[0]
    key = candidates[0].when[0]
    value = _setting(settings, key)
    for task in candidates:
        if task.when[1] == value:
            return task
    raise UnknownTaskError(f"task {name!r} has no registration for {key}={value}; "
                           f"expected one of {'|'.join(str(t.when[1]) for t in candidates)}")


def _discover() -> None:
    """Import every module in ``tasks/`` and every entry point, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import tasks  # the repository's own task files

    for module in pkgutil.iter_modules(tasks.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"tasks.{module.name}")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if callable(loaded):
            loaded()


def _import_own(name: str) -> None:
    """Import just ``tasks/<name>.py`` when there is one: a command for one task (or its one-line
    error) need not import every other task's libraries first."""
    import importlib.util

    if name.isidentifier() and not name.startswith("_"):
        try:
            if importlib.util.find_spec(f"tasks.{name}") is not None:
                importlib.import_module(f"tasks.{name}")
        except ImportError:
            pass  # no tasks package here, or a broken file: full discovery says what is known


def get(name: str) -> Task:
    """The task ``name``; of several registrations, the one its config's defaults choose."""
    if name not in _TASKS:
        _import_own(name)
    if name not in _TASKS:
        _discover()
    if name in _TASKS:
        return _pick(name, _TASKS[name][0].config())
    known = sorted(_TASKS)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownTaskError(f"unknown task {name!r}; {hint}known tasks: {', '.join(known)}")


def task_of(cfg: Any) -> Task:
    """The task a built config runs: ``cfg.task``, and of several registrations the one its settings choose."""
    get(cfg.task)
    return _pick(cfg.task, cfg)


def all_registrations(name: str) -> list[Task]:
    """Every registration of ``name`` (one, or one per value of its ``when`` setting)."""
    get(name)
    return list(_TASKS[name])


def names() -> list[str]:
    _discover()
    return sorted(_TASKS)
