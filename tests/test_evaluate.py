"""A model scored on data it never saw, and run on unlabelled images: the test split a run scores
once, ``platform.evaluate`` on another preset and on a real-layout folder, ``platform.predict``
on a folder of bare ``.npy`` files for each kind of task."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from platform import config, registry
from tests.helpers import run_cli, run_cli_here
from tests.test_data import make_deeplense_folder

SMALL_CLASSIFIER = ["model.name=resnet10t", "train.epochs=1", "scaling.num_workers=0", "data.num_train=48",
                    "data.num_val=24", "data.num_test=20", "train.batch_size=16"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """One tiny classification run through the real CLI: its MLflow store, run and folder."""
    folder = tmp_path_factory.mktemp("classifier")
    db = folder / "mlflow.db"
    result = run_cli("platform.train", "task=classification", *SMALL_CLASSIFIER, f"data.cache_dir={folder}/cache",
                     f"mlflow.tracking_uri=sqlite:///{db}", "train.name=cls", cwd=str(folder))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-classification").experiment_id])
    return {"folder": folder, "uri": f"sqlite:///{db}", "client": client, "run": run, "stdout": result.stdout,
            "stderr": result.stderr}


@pytest.mark.slow
def test_a_run_scores_its_test_split_once_with_its_best_weights(classifier):
    run, client = classifier["run"], classifier["client"]
    metrics = run.data.metrics
    assert {"test/auc_macro", "test/accuracy", "test/auc_no"} <= set(metrics)
    assert all(len(client.get_metric_history(run.info.run_id, m)) == 1 for m in metrics if m.startswith("test/"))
    assert "test/auc_macro = " in classifier["stdout"] and "20 test images" in classifier["stdout"]
    predictions = pd.read_csv(client.download_artifacts(run.info.run_id, "predictions/test.csv",
                                                        str(classifier["folder"])))
    assert len(predictions) == 20 and {"row", "label", "probs_no", "probs_sphere", "probs_vort"} <= set(predictions)
    assert np.allclose(predictions[["probs_no", "probs_sphere", "probs_vort"]].sum(axis=1), 1, atol=1e-5)
    accuracy = (predictions[["probs_no", "probs_sphere", "probs_vort"]].to_numpy().argmax(1) == predictions["label"]).mean()
    assert accuracy == pytest.approx(metrics["test/accuracy"])  # the logged number is these rows' own
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots/test")} == {
        "plots/test/roc.png", "plots/test/confusion_matrix.png"}


@pytest.mark.slow
def test_the_registered_model_holds_no_pickle_and_serves_the_trained_weights(classifier):
    """The kept model's MLflow folder: safetensors weights, its config, JSON and YAML, and no pickle in any
    file; MLflow loads it with the platform's own module, which predicts what the run's best weights do."""
    import io
    import os
    import pickletools
    import zipfile

    import mlflow.artifacts
    import mlflow.pyfunc
    import yaml

    from platform import provenance, tracking

    client, run = classifier["client"], classifier["run"]
    assert "pickle" not in (classifier["stdout"] + classifier["stderr"]).lower()  # MLflow's warning about its pickles
    (version,) = client.search_model_versions("name='classification'")
    location = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    folder = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=classifier["uri"],
                                                 dst_path=str(classifier["folder"] / "registered"))
    files = {os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names}
    assert {"MLmodel", "data/model/weights.safetensors", "data/model/config.yaml"} <= files, files
    for name in files:
        path = os.path.join(folder, name)
        assert not zipfile.is_zipfile(path), name  # torch.save's format: a pickle in a zip
        with pytest.raises(Exception):  # no file is a stream of pickle opcodes
            pickletools.dis(open(path, "rb").read(), out=io.StringIO())
    with open(os.path.join(folder, "MLmodel")) as f:
        flavors = yaml.safe_load(f)["flavors"]
    assert list(flavors) == ["python_function"]  # no pytorch flavor, whose loader unpickles
    assert {k: v for k, v in flavors["python_function"].items() if k in ("loader_module", "data", "code")} == {
        "loader_module": "platform.model_files", "data": "data/model", "code": None}
    assert not {"python_model", "artifacts", "cloudpickle_version"} & set(flavors["python_function"])

    # It predicts what the run's best weights, read on their own, predict.
    cfg = config.build("classification", [provenance.recorded_config(client, run.info.run_id)[1]])
    trained = registry.task_of(cfg).build_model(cfg).eval()
    best = client.download_artifacts(run.info.run_id, "checkpoints/best_model.pt", str(classifier["folder"]))
    trained.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    batch = np.random.default_rng(1).random((3, 1, 64, 64), dtype=np.float32)
    with tracking.using_uri(classifier["uri"]):
        served = mlflow.pyfunc.load_model(f"models:/classification/{version.version}")
    with torch.no_grad():
        assert np.allclose(served.predict(batch), trained(torch.from_numpy(batch)).numpy(), atol=1e-6)


@pytest.mark.slow
def test_evaluate_scores_a_sim_trained_model_on_another_preset(classifier):
    client, run = classifier["client"], classifier["run"]
    out = classifier["folder"] / "model_i.csv"
    result = run_cli_here("platform.evaluate", f"model={run.info.run_id}", "data.preset=model_i", "data.num_test=12",
                          f"evaluate.out={out}", f"mlflow.tracking_uri={classifier['uri']}",
                          cwd=str(classifier["folder"]))
    assert result.returncode == 0, result.stderr
    assert "on the test split of simulated model_i (seed 0): 12 images" in result.stdout
    (evaluation,) = [r for r in client.search_runs([run.info.experiment_id])
                     if r.data.tags.get("platform.kind") == "evaluation"]
    assert evaluation.data.tags["platform.model_run_id"] == run.info.run_id  # linked to the model it scored
    assert evaluation.data.params["model"] == run.info.run_id and evaluation.data.params["data.preset"] == "model_i"
    assert evaluation.data.params["model.name"] == "resnet10t"  # built as it was trained
    assert math.isfinite(evaluation.data.metrics["test/auc_macro"])
    table = pd.read_csv(out)
    assert len(table) == 12 and {"label", "probs_no", "probs_sphere", "probs_vort"} <= set(table)
    assert f"test/accuracy = {evaluation.data.metrics['test/accuracy']:.4f}" in result.stdout

    # Its own data again: the very number the run logged for its test split.
    again = run_cli_here("platform.evaluate", f"model={run.info.run_id}", f"mlflow.tracking_uri={classifier['uri']}",
                         cwd=str(classifier["folder"]))
    assert again.returncode == 0, again.stderr
    assert f"test/auc_macro = {run.data.metrics['test/auc_macro']:.4f}" in again.stdout


@pytest.mark.slow
def test_evaluate_scores_a_registered_model_on_a_real_layout_folder(classifier):
    root = make_deeplense_folder(classifier["folder"] / "real", per_class=4, shape=(1, 64, 64))
    out = classifier["folder"] / "real.parquet"
    result = run_cli_here("platform.evaluate", "model=models:/classification/latest", f"data.path={root}",
                          f"evaluate.out={out}", f"mlflow.tracking_uri={classifier['uri']}",
                          f"data.cache_dir={classifier['folder']}/cache", cwd=str(classifier["folder"]))
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(out)
    # The folder's held-out val/ is its test split: every one of its files, once, with its truth.
    assert sorted(table["file"]) == sorted(f"val/{c}/{i}.npy" for c in ("no", "sphere", "vort") for i in range(4))
    assert list(table["label"]) == [{"no": 0, "sphere": 1, "vort": 2}[f.split("/")[1]] for f in table["file"]]


@pytest.mark.slow
def test_predict_writes_class_probabilities_for_an_unlabelled_folder(classifier):
    folder = classifier["folder"] / "unlabelled"
    (folder / "night2").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name in ("a.npy", "b.npy", "night2/c.npy"):
        np.save(folder / name, rng.random((64, 64)))
    out = classifier["folder"] / "predictions.csv"
    result = run_cli_here("platform.predict", f"model={classifier['run'].info.run_id}", f"data.path={folder}",
                          f"evaluate.out={out}", f"mlflow.tracking_uri={classifier['uri']}", cwd=str(classifier["folder"]))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert list(table["file"]) == ["a.npy", "b.npy", "night2/c.npy"]
    probs = table[["probs_no", "probs_sphere", "probs_vort"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert list(table["predicted"]) == [("no", "sphere", "vort")[k] for k in probs.argmax(1)]


def save_random_model(tmp_path, task_name: str, settings: dict) -> str:
    """A checkpoint of the task's model as built (random weights): what predict does with it is the point."""
    cfg = config.build(task_name, [settings])
    torch.manual_seed(0)
    path = tmp_path / f"{task_name}.pt"
    torch.save(registry.task_of(cfg).build_model(cfg).state_dict(), path)
    return str(path)


def unlabelled(folder, shape, n=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(folder / f"img{i}.npy", rng.random(shape).astype(np.float32))
    return folder


def test_predict_gives_regression_parameters_in_their_units(tmp_path):
    settings = ["encoder.arch=resnet10t", "targets.mean=[1.0,0.0,0.0,0.2,0.05]", "targets.std=[0.2,0.1,0.1,0.1,0.02]"]
    model = save_random_model(tmp_path, "regression", {"encoder.arch": "resnet10t"})
    out = tmp_path / "params.csv"
    result = run_cli_here("platform.predict", "task=regression", f"model={model}", *settings,
                          f"data.path={unlabelled(tmp_path / 'images', (1, 64, 64))}", f"evaluate.out={out}",
                          cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert list(table.columns) == ["file", "theta_e_arcsec", "source_x_arcsec", "source_y_arcsec", "ellipticity",
                                   "shear", "shear_angle_rad"]
    assert ((table["shear_angle_rad"] >= 0) & (table["shear_angle_rad"] < math.pi)).all()


def test_predict_writes_one_super_resolved_file_per_image(tmp_path):
    model = save_random_model(tmp_path, "superres", {"model.blocks": 1, "model.channels": 8})
    out = tmp_path / "sr" / "predictions.csv"
    result = run_cli_here("platform.predict", "task=superres", f"model={model}", "model.blocks=1", "model.channels=8",
                          f"data.path={unlabelled(tmp_path / 'lr', (1, 16, 16))}", f"evaluate.out={out}",
                          cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert list(table["file"]) == ["img0.npy", "img1.npy", "img2.npy"]
    for path in table["sr"]:
        assert np.load(path).shape == (1, 32, 32)  # degrade.factor=2 times the LR image


def test_predict_marks_lenses_at_a_threshold(tmp_path):
    model = save_random_model(tmp_path, "lens_finding", {"model.name": "resnet10t", "loss.pos_weight": 16.0})
    out = tmp_path / "lenses.csv"
    result = run_cli_here("platform.predict", "task=lens_finding", f"model={model}", "model.name=resnet10t",
                          "loss.pos_weight=16", f"data.path={unlabelled(tmp_path / 'cutouts', (3, 64, 64), n=5)}",
                          f"evaluate.out={out}", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert len(table) == 5 and list(table["is_lens"]) == list(table["lens_score"] >= 0.5)  # no run: no val threshold
    assert "has no run, so no threshold chosen on its val split: lens_finding is scored at 0.5" in result.stdout

    # Scored on labelled data, a bare checkpoint is never given a threshold tuned on that data.
    small = ["data.num_train=12", "data.num_val=10", "data.num_test=10", "sim.train_positive_fraction=0.3",
             "sim.val_positive_fraction=0.3", f"data.cache_dir={tmp_path}/cache", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    scored = run_cli_here("platform.evaluate", "task=lens_finding", f"model={model}", "model.name=resnet10t",
                          "loss.pos_weight=16", *small, cwd=str(tmp_path))
    assert scored.returncode == 0, scored.stderr
    assert "test/threshold = 0.5000" in scored.stdout
    (run,) = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(["1"])
    assert run.data.params["evaluate.threshold_from"] == "the default 0.5 (a bare checkpoint)"

    # predict runs on the folder given on its command line, never on a run's recorded data.
    missing = run_cli_here("platform.predict", "task=lens_finding", f"model={model}", "model.name=resnet10t",
                           f"evaluate.out={out}", cwd=str(tmp_path))
    assert missing.returncode == 2 and "data.path= (a folder of .npy images) and evaluate.out=" in missing.stderr


@pytest.mark.parametrize("args, message", [
    ([], "error: model= is required: a run id, models:/<name>/<version|latest>, or a best_model.pt path"),
    (["model=/no/such.pt"], "error: model=/no/such.pt: no such run or file"),
    (["model=0123456789abcdef0123456789abcdef"], "error: model=0123456789abcdef0123456789abcdef: no MLflow store at"),
    (["model=MODEL", "evaluate.out=preds.txt"], "error: evaluate.out=preds.txt: expected a .csv or .parquet file name"),
    (["model=MODEL"], "error: model=MODEL is a bare checkpoint: say which task it is for (task=...)"),
    (["model=MODEL", "task=classification", "evaluate.split=all"],
     "error: evaluate.split=all is not allowed; expected one of test|val|train"),
    (["model=MODEL", "task=classification", "model.name=resnet18", "data.path=FOLDER", "evaluate.out=p.csv"],
     "error: model=MODEL does not fit task classification with these settings"),
])
def test_bad_evaluate_and_predict_input_is_one_line(tmp_path, args, message):
    model = save_random_model(tmp_path, "classification", {"model.name": "resnet10t"})
    folder = unlabelled(tmp_path / "images", (1, 64, 64))
    args = [a.replace("MODEL", model).replace("FOLDER", str(folder)) for a in args]
    for command in ("platform.evaluate", "platform.predict"):
        result = run_cli_here(command, *args, cwd=str(tmp_path))
        assert result.returncode == 2 and result.stderr.startswith(message.replace("MODEL", model)), result.stderr
        assert result.stderr.count("\n") == 1 and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("content, found", [
    (np.full((1, 64, 64), np.nan, dtype=np.float32), "found 4096 NaN and 0 infinite pixels"),
    (np.zeros((1, 64, 64), dtype=np.float32), "every pixel is 0, a blank image"),
    (np.ones((1, 64, 64), dtype=np.uint8), "found dtype uint8; expected floating-point pixels"),
])
def test_predict_refuses_an_untrustworthy_file_before_any_prediction(tmp_path, content, found):
    model = save_random_model(tmp_path, "classification", {"model.name": "resnet10t"})
    folder = unlabelled(tmp_path / "images", (1, 64, 64), n=4)
    np.save(folder / "img3.npy", content)
    out = tmp_path / "p.csv"
    result = run_cli_here("platform.predict", "task=classification", "model.name=resnet10t", f"model={model}",
                          f"data.path={folder}", f"evaluate.out={out}", cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(f"error: {folder}/img3.npy: {found}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_a_run_records_what_produced_it(classifier):
    tags = classifier["run"].data.tags
    assert tags["mlflow.source.name"] == "platform.train" and len(tags["mlflow.source.git.commit"]) == 40
    assert tags["platform.command"].startswith("python -m platform.train task=classification model.name=resnet10t")
    assert tags["platform.git_dirty"] in ("true", "false")
    assert all(tags[f"platform.version.{lib}"] for lib in ("torch", "ray", "timm", "optuna", "mlflow", "numpy",
                                                            "simulator"))
    assert {"train.seed", "data.seed"} <= set(classifier["run"].data.params)


def test_from_run_starts_from_a_runs_recorded_config(tmp_path):
    from platform import tracking

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    experiment = tracking.experiment_id(client, "deeplense-classification")
    earlier = tracking.start_run(client, experiment, "earlier", {tracking.TASK_TAG: "classification"})
    tracking.log_params(client, earlier, {"task": "classification", "train.lr": 0.005, "model.name": "resnet10t",
                                          "train.name": "earlier", "model.retired_setting": 3})
    tracking.end_run(client, earlier, "FINISHED")
    # A CPU count no machine here has stops the command after its config is built and before any work.
    result = run_cli_here("platform.train", f"from_run={earlier}", "train.lr=0.002", "scaling.num_workers=999",
                          f"mlflow.tracking_uri=sqlite:///{db}", cwd=str(tmp_path))
    assert result.returncode == 2 and "scaling.num_workers=999" in result.stderr, result.stderr
    assert (f"from_run={earlier}: 2 recorded settings of task classification; the command line changes train.lr; "
            f"not applied (unknown in this version): model.retired_setting") in result.stdout
    wrong = run_cli_here("platform.train", "task=mae", f"from_run={earlier}", f"mlflow.tracking_uri=sqlite:///{db}",
                         cwd=str(tmp_path))
    assert wrong.returncode == 2 and f"task=mae, but from_run={earlier} is a run of task=classification" in wrong.stderr

    # What a finder's data decided (its class weight) is decided again by other data, kept with the same data.
    finder = tracking.start_run(client, tracking.experiment_id(client, "deeplense-lens_finding"), "finder",
                                {tracking.TASK_TAG: "lens_finding", "platform.data_decided": "loss.pos_weight"})
    tracking.log_params(client, finder, {"loss.pos_weight": 16.0, "model.name": "resnet10t"})
    tracking.end_run(client, finder, "FINISHED")
    for data, redecided in ((["data.preset=model_iii"], True), ([], False)):
        result = run_cli_here("platform.train", f"from_run={finder}", *data, "scaling.num_workers=999",
                              f"mlflow.tracking_uri=sqlite:///{db}", cwd=str(tmp_path))
        assert result.returncode == 2, result.stderr
        assert ("the new data decides loss.pos_weight again" in result.stdout) == redecided, result.stdout
