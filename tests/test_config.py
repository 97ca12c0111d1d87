"""Configuration: layering, strict validation, one-line errors before any cluster work."""

import sys

import pytest

from platform import config, registry, space
from platform.config import ConfigError
from tests.helpers import ROOT, run_cli, run_cli_here


def test_layers_task_defaults_then_space_then_cli(tmp_path):
    spec = tmp_path / "space.yaml"
    spec.write_text("fixed:\n  train.epochs: 7\n  train.lr: 0.01\nsearch:\n  model.mask_ratio: {uniform: [0.5, 0.9]}\n")
    s = space.load(str(spec), "mae")
    cfg = config.build("mae", [s.fixed, {"train.epochs": 2}])
    assert cfg.train.epochs == 2  # key=value beats the space's fixed value
    assert cfg.train.lr == 0.01  # the space's fixed value beats the task default
    assert cfg.train.batch_size == 64 and cfg.model.mask_ratio == 0.75  # task and core defaults


def test_cli_values_are_typed():
    task, overrides = config.parse_cli(["task=mae", "train.lr=1e-4", "scaling.use_gpu=true", "data.classes=[a,b,c]"])
    assert task == "mae"
    cfg = config.build(task, [overrides])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.scaling.use_gpu is True
    assert list(cfg.data.classes) == ["a", "b", "c"]
    # YAML 1.2 scalars: DeepLense's class `no` is a string; `yes` still sets a boolean key.
    _, overrides = config.parse_cli(["data.classes=[no,sphere,vort]", "scaling.use_gpu=yes", "train.lr=3e-4"])
    assert overrides == {"data.classes": ["no", "sphere", "vort"], "scaling.use_gpu": "yes", "train.lr": 3e-4}
    assert config.build("mae", [overrides]).scaling.use_gpu is True


@pytest.mark.parametrize("override, message", [
    ({"train.epoch": 3}, "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
    ({"train.epochs": "abc"}, "train.epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ({"model.mask_ratio": 1.5}, "model.mask_ratio=1.5 is out of range; expected 0.0 <= model.mask_ratio < 1.0"),
    ({"tune.scheduler": "hyperband"}, "tune.scheduler=hyperband is not allowed; expected one of asha|none"),
    ({"scaling.num_workers": -1}, "scaling.num_workers=-1 is out of range; expected 0 <= scaling.num_workers"),
    # Names runs are found by and folders named after: nothing a filter, a path or a shell would read.
    ({"tune.name": "x' OR tags.a = 'b"}, "tune.name=x' OR tags.a = 'b is not a name the platform can use; use "
                                         "letters, digits and _ . -"),
    ({"tune.name": "../elsewhere"}, "tune.name=../elsewhere is not a name the platform can use"),
    ({"train.name": "my run"}, "train.name=my run is not a name the platform can use"),
    ({"mlflow.experiment": "lens'finding"}, "mlflow.experiment=lens'finding is not a name the platform can use; "
                                            "use letters, digits, spaces and _ . , : / -"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as error:
        config.build("mae", [override])
    assert str(error.value).startswith(message)


def test_unknown_task_names_the_closest_and_the_known():
    with pytest.raises(registry.UnknownTaskError, match=r"unknown task 'clasification'; did you mean 'classification'\? known tasks: .*mae"):
        registry.get("clasification")


def test_config_round_trips_through_a_plain_dict():
    cfg = config.build("classification", [{"train.lr": 0.02, "augment.strength": 0.1}])
    assert config.from_dict(config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("content, message", [
    ("search:\n  train.lr: {logunif: [1.0e-4, 1.0e-2]}\n", "unknown distribution 'logunif'; expected one of uniform, loguniform, int, choice"),
    ("search:\n  model.mask_ratio: {uniform: [0.5, 1.5]}\n", "model.mask_ratio=1.5 is out of range"),
    ("search:\n  model.mask: {uniform: [0.5, 0.9]}\n", "unknown config key 'model.mask'"),
    ("search:\n  train.lr: {loguniform: [0.0, 0.1]}\n", "loguniform needs low > 0"),
    ("serch:\n  train.lr: {uniform: [0.1, 0.2]}\n", "unknown section(s) serch"),
    # Conditions: on a searched choice, with values among its options, without cycles.
    ("search:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2], when: {train.optimiser: [sgd]}}\n"
     "  train.optimizer: {choice: [adamw, sgd]}\n",
     "train.lr: when: train.optimiser is not searched in this space; a condition names a searched choice key "
     "(train.optimizer)"),
    ("search:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2], when: {train.optimizer: [sdg]}}\n"
     "  train.optimizer: {choice: [adamw, sgd]}\n",
     "train.lr: when: train.optimizer=sdg is not one of its choices (adamw, sgd)"),
    ("search:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2], when: {model.mask_ratio: [0.5]}}\n"
     "  model.mask_ratio: {uniform: [0.5, 0.9]}\n",
     "train.lr: when: model.mask_ratio is a uniform; a condition names a searched choice key"),
    ("search:\n  train.optimizer: {choice: [adamw, sgd], when: {train.schedule: [cosine]}}\n"
     "  train.schedule: {choice: [cosine, constant], when: {train.optimizer: [sgd]}}\n",
     "conditions form a cycle: train.optimizer -> train.schedule -> train.optimizer"),
    ("search:\n  train.optimizer:\n    choice:\n      adamw: {train.lr: {uniform: [0.001, 0.01]}}\n"
     "      sgd: {train.lr: {uniform: [0.01, 0.1]}}\n",
     "train.lr is searched twice (under two options of a choice"),
])
def test_bad_search_spaces(tmp_path, content, message):
    spec = tmp_path / "space.yaml"
    spec.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        space.load(str(spec), "mae")


def test_shipped_search_spaces_are_valid():
    for name in registry.names():
        s = space.load(space.default_path(registry.get(name)), name)
        assert s.params, name


@pytest.mark.parametrize("args, message", [
    (["task=maee"], "error: unknown task 'maee'; did you mean 'mae'?"),
    (["task=mae", "train.epoch=3"], "error: unknown config key 'train.epoch'"),
    (["task=mae", "train.epochs=three"], "error: train.epochs=three: Value 'three'"),
    (["task=mae", "model.mask_ratio=1.5"], "error: model.mask_ratio=1.5 is out of range"),
    (["task=mae", "data.source=folder", "data.path=/no/such/folder"], "error: data.path=/no/such/folder does not exist"),
    (["task=mae", "tune.space=bad.yaml"], "error: bad.yaml: train.lr: unknown distribution 'gaussian'"),
    (["task=mae", "epochs"], "error: expected key=value, got 'epochs'"),
    (["task=mae", "scaling.num_workers=1000"], "error: scaling.num_workers=1000 x scaling.cpus_per_worker=auto (at least 1) needs 1000 CPUs"),
    (["task=mae", "scaling.use_gpu=true", "scaling.gpus_per_worker=64"], "error: scaling.use_gpu=true needs 64 GPUs"),
    (["task=mae", "mlflow.tracking_uri=ftp://host/x"], "error: mlflow.tracking_uri=ftp://host/x is not an MLflow store"),
    (["task=mae", "ray.address=http://127.0.0.1:8265"], "error: ray.address=http://127.0.0.1:8265 is a dashboard"),
    (["task=mae", "ray.address=127.0.0.1:1"], "error: ray.address=127.0.0.1:1: no Ray head answers"),
    # `no` stays the class name, not YAML 1.1's false; the simulator makes three classes.
    (["task=classification", "data.classes=[no,sphere]", "data.num_train=8", "data.num_val=4"],
     "error: data.classes=[no,sphere] but the train data at"),
    (["task=mae", "data.classes=[no,"], "error: data.classes=[no,: not valid YAML"),
    # The space is checked with the command line's values: decoder_dim 32 cannot hold 64 heads.
    (["task=mae", "model.decoder_heads=64"],
     f"error: {ROOT}/search_spaces/mae.yaml: model.decoder_dim=32 must be a multiple of 4 and of model.decoder_heads=64"),
    (["task=mae", "tune.space=."], "error: tune.space=.: no such file"),
    (["task=mae", "tune.space=list.yaml"], "error: list.yaml: expected a mapping with fixed: and search:"),
    (["task=mae", "train.lr=.nan"], "error: train.lr=nan is not a number"),
    # Objectives and constraints: what the search may see (val/, model/), and what each setting needs.
    (["task=classification", "tune.objectives=[test/auc_macro:max]"],
     "error: tune.objectives: test/auc_macro:max is a test metric; the search sees the val split only"),
    (["task=classification", "tune.objectives=[val/auc_macro:best]"],
     "error: tune.objectives: val/auc_macro:best is not metric:max or metric:min"),
    (["task=classification", "tune.objectives=[val/auc_macro:max,model/flops:min]"],
     "error: tune.objectives: model/flops:min names no metric a run logs; expected val/<a metric of the task>"),
    (["task=classification", "tune.objectives=[val/auc_macro:max,val/auc_macro:min]"],
     "error: tune.objectives names val/auc_macro twice"),
    (["task=classification", "tune.objectives=val/auc_macro:max"],
     "error: tune.objectives=val/auc_macro:max is not allowed; expected a list in brackets"),
    (["task=classification", "tune.constraints=[model/params<5e6]"],
     "error: tune.constraints: model/params<5e6 is not metric<=number or metric>=number"),
    (["task=classification", "tune.search=nsga2"], "error: tune.search=nsga2 is a multi-objective search"),
    (["task=classification", "tune.objectives=[model/params:min,val/auc_macro:max]"],
     "error: tune.scheduler=asha stops trials on the first objective's value each epoch, and model/params is not"),
    (["task=classification", "tune.pick=knee"], "error: tune.pick=knee chooses among a Pareto front"),
    (["task=pinn", "tune.scheduler=pbt"], "error: tune.scheduler=pbt perturbs the values a trial runs with, and "
                                          "physics.warmup_epochs is searched only under a condition"),
    (["task=classification", "tune.scheduler=pbt", "tune.perturbation_interval=3"],
     "error: tune.perturbation_interval=3 leaves no exploit within train.epochs=3"),
    (["task=classification", "tune.scheduler=pbt", "tune.objectives=[val/auc_macro:max,model/params:min]"],
     "error: tune.scheduler=pbt ranks its population on one metric"),
])
def test_bad_input_exits_before_any_cluster_work(tmp_path, args, message):
    (tmp_path / "bad.yaml").write_text("search:\n  train.lr: {gaussian: [0.1, 0.2]}\n")
    (tmp_path / "list.yaml").write_text("- train.lr\n")
    result = run_cli_here("platform.tune", *args, f"data.cache_dir={tmp_path}/cache", cwd=str(tmp_path),
                          env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    # Nothing was started or written: no MLflow store, no Ray results, no Ray session.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.parametrize("args, message", [
    (["task=maee"], "error: unknown task 'maee'; did you mean 'mae'?"),
    (["task=mae", "train.epochs=three"], "error: train.epochs=three: Value 'three'"),
    (["task=mae", "ray.address=127.0.0.1:1"], "error: ray.address=127.0.0.1:1: no Ray head answers"),
    # No tracking server there: one line at once, not MLflow's minutes of retries and tracebacks.
    (["task=mae", "mlflow.tracking_uri=http://127.0.0.1:1"],
     "error: mlflow.tracking_uri=http://127.0.0.1:1: nothing answers at 127.0.0.1:1"),
])
@pytest.mark.slow  # real interpreters
def test_a_real_process_prints_only_the_one_line(tmp_path, args, message):
    # What the user's terminal shows: no warning or log line from a library beside the error.
    # timeout: a hang guard (MLflow alone would retry an absent server for 4 minutes), not a speed test
    result = run_cli("platform.tune", *args, f"data.cache_dir={tmp_path}/cache", cwd=str(tmp_path),
                     env={"RAY_ADDRESS": ""}, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == result.stderr.strip().splitlines()[0], result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_what_the_data_decided_is_compared_on_resume_like_any_other_setting():
    """A sweep records the settings its data decided; a resume decides them again from the same
    data (the same values: no change), and a command that would decide others is refused."""
    from platform import tracking
    from platform.tune import setting_change

    recorded = tracking.public_params(config.flatten(config.to_dict(config.build("lens_finding", [{"loss.pos_weight": 5}]))))
    assert setting_change(recorded, config.build("lens_finding", [{"loss.pos_weight": 5.0}])) is None
    assert setting_change(recorded, config.build("lens_finding", [{"loss.pos_weight": 16.4}])) == \
        "loss.pos_weight=5.0; this command has loss.pos_weight=16.4"
    assert setting_change(recorded, config.build("lens_finding", [{"loss.pos_weight": 5, "train.lr": 0.01}])) == \
        f"train.lr={recorded['train.lr']}; this command has train.lr=0.01"


def test_a_conditional_space_samples_a_key_only_when_its_condition_holds(tmp_path):
    import optuna

    spec = tmp_path / "space.yaml"
    spec.write_text("""search:
  physics.warmup_epochs: {int: [0, 2], when: {physics.schedule: [linear, cosine, step]}}
  physics.schedule: {choice: [constant, linear, cosine, step]}
  train.optimizer:
    choice:
      adamw: {train.weight_decay: {loguniform: [1.0e-5, 1.0e-1]}}
      sgd:
        train.schedule:
          choice:
            cosine: {train.warmup_epochs: {int: [0, 2]}}
            constant: {}
""")
    searched = space.load(str(spec), "pinn")
    # Each key after the keys its conditions name: the order define-by-run samples them in.
    order = list(searched.params)
    assert order.index("physics.schedule") < order.index("physics.warmup_epochs")
    assert searched.params["train.warmup_epochs"].when == {"train.optimizer": ["sgd"], "train.schedule": ["cosine"]}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: space.sample(trial, searched.params) or 0.0, n_trials=60)
    branches = set()
    for trial in study.trials:
        p = trial.params
        assert ("physics.warmup_epochs" in p) == (p["physics.schedule"] != "constant"), p
        assert ("train.weight_decay" in p) == (p["train.optimizer"] == "adamw"), p
        assert ("train.schedule" in p) == (p["train.optimizer"] == "sgd"), p
        assert ("train.warmup_epochs" in p) == (p.get("train.schedule") == "cosine"), p  # nested
        # What the insight and the report read back from a trial's logged values, defaults included.
        logged = {**{key: 0 for key in searched.params}, **p}
        assert sorted(space.sampled_keys(searched.params, logged)) == sorted(p)
        branches.add((p["physics.schedule"], p["train.optimizer"], p.get("train.schedule")))
    assert len(branches) >= 8
