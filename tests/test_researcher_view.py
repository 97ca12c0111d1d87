"""The researcher's view: Grad-CAM and embedding maps of a run, a sweep that explains itself on its
parent run, ``platform.insight``, ``platform.report`` and what the MLflow UI's server shows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from mlflow.tracking import MlflowClient

from platform import config as config_lib
from platform import explain, registry
from platform.data import shards as shards_lib
from platform.runner import data_and_settings
from tests.helpers import assert_figure, free_port, run_cli, run_cli_here, tiny

CLASSIFIERS = ("classification", "lens_finding", "multitask", "pinn", "mae_finetune")

# ---------------------------------------------------------------------------- Grad-CAM and embeddings, in-process


class Masked(nn.Module):
    """Channel k sees only half k of the image: class 0's evidence is on the left, class 1's on the right."""

    def __init__(self, size: int):
        super().__init__()
        left = torch.zeros(size, size)
        left[:, : size // 2] = 1
        self.register_buffer("masks", torch.stack([left, 1 - left]))  # (2, H, W)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, 2, H, W)
        return images * self.masks


class Halves(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.scale = nn.Conv2d(1, 1, 1, bias=False)  # a parameter, as every real model has
        nn.init.ones_(self.scale.weight)
        self.masked = Masked(size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.masked(self.scale(images)).mean(dim=(2, 3))  # (B, 2) logits


def test_gradcam_puts_the_heat_where_the_predicted_class_evidence_is():
    size = 16
    images = torch.zeros(4, 1, size, size)
    for i, column in enumerate((2, 4, 11, 13)):  # two blobs on the left (class 0), two on the right (class 1)
        images[i, 0, 6:9, column:column + 2] = 1.0
    model = Halves(size)
    target = explain.GradCamTarget(model, [model.masked])
    with torch.no_grad():
        predicted, confidence = explain.predictions(model(images))
    assert predicted.tolist() == [0, 0, 1, 1] and np.all(confidence > 0.5)

    maps = explain.gradcam_maps(target, images, predicted)  # (4, H, W)
    assert maps.shape == (4, size, size)
    for i, column in enumerate((2, 4, 11, 13)):
        half = slice(0, size // 2) if predicted[i] == 0 else slice(size // 2, size)
        assert maps[i][:, half].sum() > 0.95 * maps[i].sum()  # all of it on the predicted class's half
        peak = np.unravel_index(maps[i].argmax(), maps[i].shape)
        assert 6 <= peak[0] <= 8 and column - 1 <= peak[1] <= column + 2  # at the blob
    # Asked for the other class, the same image lights up nothing on its blob's half.
    against = explain.gradcam_maps(target, images[:1], np.array([1]))
    assert against[0][:, : size // 2].sum() <= 1e-6 + 0.05 * max(against[0].sum(), 1e-6)


def test_examples_are_the_first_correct_and_misclassified_of_each_class_in_order():
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2, 0, 2])
    chosen = explain.pick_examples(labels, predicted, ["no", "sphere", "vort"], per_class=2)
    assert chosen == {(0, True): [0, 6], (0, False): [1], (1, True): [2, 3], (1, False): [4], (2, True): [5, 7],
                      (2, False): []}


def test_a_binary_finder_is_explained_at_its_own_decision_threshold(tmp_path):
    """Lens finding's weighted loss pushes probabilities up: at 0.5 most non-lenses would be
    "lenses". The views use the val/threshold the run logged at its best epoch."""
    from platform import runs, tracking

    logits = torch.logit(torch.tensor([[0.3], [0.6], [0.9]]))  # (3, 1): probabilities of a lens
    assert explain.predictions(logits)[0].tolist() == [0, 1, 1]
    predicted, confidence = explain.predictions(logits, threshold=0.8)
    assert predicted.tolist() == [0, 0, 1] and np.allclose(confidence, [0.7, 0.4, 0.9])

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracking.start_run(client, tracking.experiment_id(client, "finder"), "run", {})
    assert runs.at_best_epoch(client, run, "val/threshold") is None  # nothing logged yet: 0.5
    for epoch, threshold in ((1, 0.3), (2, 0.8), (3, 0.6)):
        tracking.log_metrics(client, run, {"val/threshold": threshold}, step=epoch)
    tracking.set_tags(client, run, {"platform.best_epoch": 2})
    assert runs.at_best_epoch(client, run, "val/threshold") == pytest.approx(0.8)


def batches_of(labels: np.ndarray, size: int, labelled: bool = True) -> list[dict]:
    """Numpy batches as a split is read: an image column (here the row's position) and its labels."""
    rows = np.arange(len(labels))
    return [{"image": rows[i:i + size], **({"label": labels[i:i + size]} if labelled else {})}
            for i in range(0, len(labels), size)]


def test_the_views_show_every_class_of_an_imbalanced_split():
    # A lens finder's split: one lens in 25 images. The first 40 images would hold one lens; the
    # views show all of them, then the first non-lenses, in the order the split was read.
    labels = (np.arange(200) % 25 == 7).astype(np.int64)  # lenses at 7, 32, 57, ...
    views = explain.ViewRows(40, num_classes=2).feed(batches_of(labels, 16))
    rows = views.rows()
    lenses = np.flatnonzero(labels == 1)
    assert list(rows["image"]) == sorted([*lenses, *np.flatnonzero(labels == 0)[:40 - len(lenses)]])
    assert list(rows["label"]) == list(labels[rows["image"]])
    assert views.seen == 200  # the lenses were scarce: the whole split was read

    # Balanced classes: an even share of each, the first of each, and reading stops once they are there.
    labels = np.arange(3000) % 3
    views = explain.ViewRows(30, num_classes=3).feed(batches_of(labels, 8))
    assert list(views.rows()["image"]) == list(range(30)) and views.seen == 32
    # A class with fewer rows than its share: the others fill in, rows never beyond what was asked.
    labels = np.array([2] * 2 + [0, 1] * 30)
    rows = explain.ViewRows(12, num_classes=3).feed(batches_of(labels, 5)).rows()
    assert np.bincount(rows["label"]).tolist() == [5, 5, 2] and len(rows["image"]) == 12
    rows = explain.ViewRows(12, num_classes=3).feed(batches_of(np.array([0] * 20 + [1] * 2), 5)).rows()
    assert np.bincount(rows["label"]).tolist() == [10, 2]
    # No labels (a regression's rows colour by a truth parameter): the first rows.
    rows = explain.ViewRows(10, num_classes=3).feed(batches_of(np.zeros(50), 7, labelled=False)).rows()
    assert list(rows["image"]) == list(range(10))
    assert explain.ViewRows(10, num_classes=3).rows() == {}


def test_the_embedding_map_keeps_separate_classes_apart():
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 64)) + 6.0 * np.eye(3, 64)[labels]  # three clusters in 64-D
    points = explain.project_2d(features)  # PCA, then t-SNE
    assert points.shape == (120, 2)
    assert cross_val_score(KNeighborsClassifier(5), points, labels, cv=4).mean() > 0.95
    noise = explain.project_2d(rng.normal(size=(120, 64)))
    assert cross_val_score(KNeighborsClassifier(5), noise, labels, cv=4).mean() < 0.6  # nothing to find: nothing found


@pytest.mark.parametrize("task_name", [*CLASSIFIERS, "mae", "regression", "autoencoder"])
def test_every_task_with_an_encoder_draws_its_views(task_name, tmp_path):
    task = registry.get(task_name)
    finder = {"sim.val_positive_fraction": 0.3, "sim.train_positive_fraction": 0.3} if task_name == "lens_finding" else {}
    cfg = config_lib.build(task_name, [{"data.cache_dir": str(tmp_path), "data.num_train": 16, "data.num_val": 40,
                                        "plots.gradcam_per_class": 2, **finder}])
    splits, cfg = data_and_settings(task, cfg)
    rows = shards_lib.head(splits["val"], 40)
    figures = explain.model_views(task.build_model(cfg), task, cfg, rows, torch.device("cpu"))
    expected = {"embeddings.png"} | ({"gradcam.png"} if task_name in CLASSIFIERS else set())
    assert set(figures) == expected
    if "gradcam.png" in figures:  # a row per class, correct images then misclassified ones
        assert figures["gradcam.png"].axes[0].get_subplotspec().get_gridspec().get_geometry() == (
            len(cfg.data.classes), 4)
    title = figures["embeddings.png"].axes[0].get_title()
    assert f"{len(rows['image'])} images" in title and ("theta_e" in title if task_name == "regression" else "label" in title)

    off = config_lib.build(task_name, [{"plots.gradcam": False, "plots.embeddings": False}])
    assert explain.model_views(task.build_model(off), task, off, rows, torch.device("cpu")) == {}


def test_long_data_generation_shows_a_progress_bar(monkeypatch, capsys):
    from platform.data import simulate

    monkeypatch.setattr(shards_lib, "PROGRESS_MIN_ROWS", 50)
    simulate.simulate("model_ii", 64, seed=0)
    assert re.search(r"simulating model_ii \(seed 0\): 100%.*64/64", capsys.readouterr().err)
    simulate.simulate("model_ii", 8, seed=0)  # a few seconds' work: quiet
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- two sweeps, looked at


def sweep(store: dict, task: str, name: str, trials: int) -> None:
    """``platform.tune`` of ``task`` into the store, on the session's head; its output in store["out"][name]."""
    result = run_cli("platform.tune", f"task={task}", f"tune.name={name}", f"tune.num_samples={trials}",
                     "train.epochs=2", "scaling.num_workers=0",
                     *tiny(store["folder"] / "cache", store["db"], "data.num_val=48"), cwd=str(store["folder"]),
                     env={"RAY_ADDRESS": store["ray_address"]})
    store["out"][name] = result.stdout + result.stderr
    assert result.returncode == 0, store["out"][name][-4000:]


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_head):
    """A store holding a finished classification sweep (3 trials). On the session's head: a module
    fixture is made before the per-test one that sets RAY_ADDRESS."""
    folder = tmp_path_factory.mktemp("researcher")
    db = folder / "mlflow.db"
    made = {"folder": folder, "db": db, "uri": f"sqlite:///{db}", "out": {}, "ray_address": ray_head["address"]}
    sweep(made, "classification", "cls", 3)
    return made


@pytest.fixture(scope="module")
def two_sweeps(store):
    """The store with the autoencoder baseline's sweep (2 trials) beside the classification one; a
    fixture of its own, so that no one test waits for both sweeps."""
    sweep(store, "autoencoder", "ae", 2)
    return store


def parent_of(client, sweep: str):
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   filter_string=f"tags.`platform.sweep` = '{sweep}' and tags.`platform.kind` = 'sweep'")
    return parent


@pytest.mark.slow
def test_a_sweep_shows_the_task_metrics_and_one_line_per_epoch(store):
    out = store["out"]["cls"]
    header = [line for line in out.splitlines() if "Trial name" in line and "status" in line][-1]  # with results
    assert re.search(r"val/auc_macro\s+best/auc_macro\s+train/loss\s+val/accuracy", header), header
    epoch_line = re.compile(r"\[classification\] epoch 2/2 +[\d.]+ steps/s +train/loss [\d.]+ +val/auc_macro "
                            r"[\d.]+ \(best [\d.]+\) +\d+ samples on 1 worker in [\d.]+s +ETA 0m00s")
    assert epoch_line.search(out), out[-3000:]


@pytest.mark.slow
def test_the_best_trial_shows_gradcam_and_its_embedding_map(store):
    client = MlflowClient(store["uri"])
    parent = parent_of(client, "cls")
    best = parent.data.tags["platform.best_run_id"]
    for figure in ("plots/gradcam.png", "plots/embeddings.png", "plots/roc.png"):
        assert_figure(client, best, figure)


@pytest.mark.slow
def test_the_parent_run_explains_the_sweep(store):
    client = MlflowClient(store["uri"])
    parent = parent_of(client, "cls")
    trials = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 3
    for figure in ("optimization_history", "param_importances", "parallel_coordinate"):
        assert_figure(client, parent.info.run_id, f"sweep/{figure}.png")

    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials.csv", str(store["folder"] / "t1")))
    searched = ["train.lr", "train.weight_decay", "train.batch_size", "augment.strength"]
    assert {"trial_id", "run_id", "state", "epochs", "final_val/auc_macro", "best/auc_macro", *searched} <= set(table)
    assert sorted(table["run_id"]) == sorted(t.info.run_id for t in trials)
    by_run = {t.info.run_id: t for t in trials}
    for row in table.to_dict("records"):
        run = by_run[row["run_id"]]
        assert row["epochs"] == run.data.metrics["epoch"]
        assert row["state"] == ("STOPPED_EARLY" if run.data.tags.get("platform.stopped_early") == "true" else "COMPLETE")
        assert row["final_val/auc_macro"] == pytest.approx(run.data.metrics["val/auc_macro"])
        assert row["best/auc_macro"] == pytest.approx(run.data.metrics["best/auc_macro"])
        assert row["train.lr"] == pytest.approx(float(run.data.params["train.lr"]))
    parquet = pd.read_parquet(client.download_artifacts(parent.info.run_id, "trials.parquet", str(store["folder"] / "t2")))
    assert len(parquet) == 3 and list(parquet.columns) == list(table.columns)

    # The best trial's values are the parent's params and metrics: MLflow's compare view lines up sweeps.
    best = client.get_run(parent.data.tags["platform.best_run_id"])
    assert {k: parent.data.params[k] for k in searched} == {k: best.data.params[k] for k in searched}
    assert json.loads(parent.data.tags["platform.best_params"]) == {k: config_lib.load_yaml(best.data.params[k])
                                                                    for k in searched}
    assert parent.data.metrics["best/auc_macro"] == best.data.metrics["best/auc_macro"] == max(table["best/auc_macro"])
    assert parent.data.metrics["val/accuracy"] == best.data.metrics["val/accuracy"]
    assert parent.data.metrics["sweep/trials"] == 3 and parent.data.metrics["sweep/failed"] == 0
    assert parent.data.metrics["sweep/stopped_early"] == (table["state"] == "STOPPED_EARLY").sum()


@pytest.mark.slow
def test_insight_rebuilds_a_finished_sweeps_figures_from_mlflow_alone(two_sweeps):
    store = two_sweeps
    client = MlflowClient(store["uri"])
    parent = parent_of(client, "ae")
    artifacts = client.get_run(parent.info.run_id).info.artifact_uri  # a local folder here
    for name in ("sweep", "trials.csv", "trials.parquet"):
        path = os.path.join(artifacts, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    # source/: the uncommitted diff, when the sweep ran from a changed tree
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} - {"source"} == {"sweep.yaml"}

    result = run_cli_here("platform.insight", "task=autoencoder", "tune.name=ae", f"mlflow.tracking_uri={store['uri']}",
                          cwd=str(store["folder"]))
    assert result.returncode == 0, result.stderr
    assert parent.info.run_id in result.stdout
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} - {"source"} == {
        "sweep", "sweep.yaml", "trials.csv", "trials.parquet"}
    assert len(pd.read_csv(client.download_artifacts(parent.info.run_id, "trials.csv", str(store["folder"] / "t3")))) == 2

    missing = run_cli_here("platform.insight", "task=autoencoder", "tune.name=nope",
                           f"mlflow.tracking_uri={store['uri']}", cwd=str(store["folder"]))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "tune.name=nope" in missing.stderr


@pytest.mark.slow
def test_the_report_holds_the_best_run_of_each_sweep_beside_the_published_numbers(two_sweeps):
    store = two_sweeps
    out = store["folder"] / "report"
    result = run_cli_here("platform.report", f"mlflow.tracking_uri={store['uri']}", f"report.out={out}",
                          "report.ui_url=http://127.0.0.1:5000", cwd=str(store["folder"]))
    assert result.returncode == 0, result.stderr
    text = (out / "report.md").read_text()
    client = MlflowClient(store["uri"])
    rows = [line for line in text.splitlines() if line.startswith("| cls ") or line.startswith("| ae ")]
    assert len(rows) == 2
    for sweep, task, metric, trials in (("cls", "classification", "auc_macro", 3), ("ae", "autoencoder", "recon_mse", 2)):
        parent = parent_of(client, sweep)
        best = parent.data.tags["platform.best_run_id"]
        (row,) = [r for r in rows if r.startswith(f"| {sweep} ")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"sweep, {trials} trials"
        # The headline is the test split's number, scored once for the best trial; beside it the val it was chosen by.
        assert cells[2] == f"**{parent.data.metrics[f'test/{metric}']:.4g}**"
        assert cells[3] == f"{parent.data.metrics[f'best/{metric}']:.4g}"
        assert "simulated (model_ii), 48 train / 48 val / 48 test images" == cells[6]
        # What the sweep spent: its trials' node time, on the parent run; a head without an autoscaler has
        # no node type but "head", and no price.
        assert [k for k in parent.data.metrics if k.startswith("cost/node_hours/")] == ["cost/node_hours/head"]
        node_hours = parent.data.metrics["cost/node_hours/head"]
        assert node_hours > 0 and cells[7] == f"{parent.data.metrics['cost/gpu_hours']:.3g} GPU-h; {node_hours:.3g} node-h"
        assert cells[8] == f"[{best[:8]}](http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{best}?workflowType=machine_learning)"
        assert f"## {task}: {metric} ({'higher' if metric == 'auc_macro' else 'lower'} is better)" in text
    # Beside each: what was published, with its data and protocol stated.
    assert "| 0.9942 | micro-average one-vs-rest ROC AUC" in text and "simulated Model F" in text
    assert "anomaly-detection ROC AUC" in text
    assert (out / "report.png").stat().st_size > 10_000

    bad = run_cli_here("platform.report", "report.outt=x", cwd=str(store["folder"]))
    assert bad.returncode == 2 and "did you mean 'report.out'" in bad.stderr


def get(base: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{base}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


def post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def ui_server(store):
    """A real ``mlflow server`` on loopback over the store: its base URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", store["uri"], "--workers", "1"],
                              cwd=str(store["folder"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(1)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow
def test_the_mlflow_ui_server_shows_the_sweep(store, ui_server):
    """What the UI's pages ask its server for, asked of a real ``mlflow server`` on loopback."""
    base = ui_server
    with urllib.request.urlopen(f"{base}/", timeout=30) as response:  # the UI itself
        assert response.status == 200 and b"<html" in response.read().lower()

    experiment = get(base, "/api/2.0/mlflow/experiments/get-by-name",
                     experiment_name="deeplense-classification")["experiment"]
    runs = post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                       "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    (parent,) = [r for r, t in zip(runs, tags) if t.get("platform.kind") == "sweep"]
    parent_id = parent["info"]["run_id"]
    nested = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id]
    assert len(nested) == 3 and all(r["info"]["status"] == "FINISHED" for r in nested)

    best_id = {t["key"]: t["value"] for t in parent["data"]["tags"]}["platform.best_run_id"]
    history = get(base, "/api/2.0/mlflow/metrics/get-history", run_id=best_id, metric_key="val/auc_macro")["metrics"]
    assert [m["step"] for m in history] == [1, 2]
    plots = {f["path"] for f in get(base, "/api/2.0/mlflow/artifacts/list", run_id=best_id, path="plots")["files"]}
    assert {"plots/gradcam.png", "plots/embeddings.png", "plots/roc.png", "plots/confusion_matrix.png"} <= plots
    with urllib.request.urlopen(f"{base}/get-artifact?path=plots/gradcam.png&run_uuid={best_id}", timeout=30) as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"  # the image the UI's artifact view displays
    sweep_files = {f["path"] for f in get(base, "/api/2.0/mlflow/artifacts/list", run_id=parent_id)["files"]}
    assert {"sweep", "trials.csv", "trials.parquet", "sweep.yaml"} <= sweep_files

    model = get(base, "/api/2.0/mlflow/registered-models/get", name="classification")["registered_model"]
    (version,) = model["latest_versions"]
    assert version["run_id"] == best_id
    # MLflow 3's UI shows an experiment as model training, not GenAI traces, by this tag.
    assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"


def test_each_command_prints_the_link_to_its_run_in_the_ui():
    from platform import cli

    link = "/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert cli.ui_hint("sqlite:////tmp/m.db", "3", "abc") == (
        "MLflow UI:  mlflow ui --backend-store-uri sqlite:////tmp/m.db --host 127.0.0.1   then open "
        f"http://127.0.0.1:5000{link}")
    assert cli.ui_hint("https://me:s3cret@mlflow.lab.org", "3", "abc") == f"MLflow UI:  https://mlflow.lab.org{link}"
    assert cli.ui_hint("databricks", "3", "abc") == "MLflow UI:  databricks"


def browser() -> str:
    """Debian's Chromium (.ci/run installs it): nothing is downloaded at test time."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium): the MLflow UI is not opened in a browser")
    return found


def rendered_text(url: str) -> tuple[str, str]:
    """A page of the UI as a headless Chromium renders it, its scripts run: (its DOM, the text a person reads)."""
    result = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                             "--dump-dom", url], capture_output=True, text=True, timeout=180)
    dom = result.stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)))
    return dom, text


@pytest.mark.slow
def test_the_mlflow_ui_in_a_browser_shows_the_sweep(store, ui_server):
    """The link a sweep prints, opened in a headless browser: the parent run with its trials, then
    the experiment's runs in the model-training view, then the best trial's Grad-CAM image."""
    client = MlflowClient(store["uri"])
    parent = parent_of(client, "cls")
    best = parent.data.tags["platform.best_run_id"]
    experiment = parent.info.experiment_id
    printed = re.search(r"then open (http://127\.0\.0\.1:5000/\S+)", store["out"]["cls"]).group(1)
    assert printed == f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{parent.info.run_id}?workflowType=machine_learning"

    _, text = rendered_text(printed.replace("http://127.0.0.1:5000", ui_server))
    trials = [r.info.run_name for r in client.search_runs([experiment]) if r.info.run_id != parent.info.run_id]
    assert "cls" in text and "Child runs" in text and all(name in text for name in trials), text[:3000]

    _, text = rendered_text(f"{ui_server}/#/experiments/{experiment}?workflowType=machine_learning")
    assert "Run Name" in text and " cls " in text and "4 matching runs" in text, text[:3000]

    dom, _ = rendered_text(f"{ui_server}/#/experiments/{experiment}/runs/{best}/artifacts/plots/gradcam.png"
                           "?workflowType=machine_learning")
    assert re.search(r'<img alt="plots/gradcam.png" src="blob:', dom), dom[-3000:]  # the PNG, fetched and shown


@pytest.mark.slow
def test_plots_can_be_turned_off(store):
    db = store["folder"] / "off.db"
    result = run_cli("platform.train", "task=lens_finding", "train.epochs=1", "scaling.num_workers=0",
                     "plots.gradcam=false", "plots.embeddings=false",
                     *tiny(store["folder"] / "cache", db, "data.num_val=200"), cwd=str(store["folder"]))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-lens_finding").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/roc.png", "plots/pr.png",
                                                                                "plots/test"}


def test_a_figure_that_fails_never_fails_the_run(tmp_path, capsys):
    import dataclasses

    from platform import explain, tracking

    task = registry.get("mae")

    def broken(model, batch, cfg):
        raise RuntimeError("no features here\nsecond line")

    cfg = config_lib.build("mae", [{"data.cache_dir": str(tmp_path), "data.num_train": 8, "data.num_val": 8}])
    rows = shards_lib.head(task.build_data(cfg)["val"], 8)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run(client, tracking.experiment_id(client, "views"), "run", {})
    model = task.build_model(cfg)
    explain.log_best_views(client, run_id, dataclasses.replace(task, embed=broken), cfg, model, model.state_dict(), rows,
                           torch.device("cpu"))
    assert client.get_run(run_id).data.tags["platform.views_error"] == "RuntimeError: no features here"
    assert "warning: Grad-CAM / embedding figures failed (RuntimeError: no features here)" in capsys.readouterr().out
    assert client.list_artifacts(run_id) == []


def fake_sweep(client, trials: list[dict]) -> str:
    """A parent run and its trial runs, as platform.tune records them: {"lr", "value" or None, "status"}."""
    from platform import tracking

    experiment = tracking.experiment_id(client, "insight")
    space = {"search": {"train.lr": ["loguniform", [1e-4, 1e-2]], "train.batch_size": ["choice", [32, 64]]},
             "fixed": {}}
    parent = tracking.start_run(client, experiment, "sw", {tracking.SWEEP_TAG: "sw", tracking.KIND_TAG: "sweep",
                                                           tracking.SPACE_TAG: json.dumps(space)})
    for k, trial in enumerate(trials):
        run = tracking.start_run(client, experiment, f"sw-{k}", {tracking.SWEEP_TAG: "sw", tracking.TRIAL_TAG: f"t{k}",
                                                                tracking.TASK_TAG: "classification"}, parent=parent)
        tracking.log_params(client, run, {"train.lr": trial["lr"], "train.batch_size": 32 + 32 * (k % 2)})
        if trial["value"] is not None:
            for epoch in (1, 2):
                tracking.log_metrics(client, run, {"val/auc_macro": trial["value"], "best/auc_macro": trial["value"],
                                                   "epoch": epoch}, step=epoch)
        else:
            tracking.set_tags(client, run, {tracking.FAILURE_TAG: "FloatingPointError: train/loss became nan"})
        tracking.end_run(client, run, trial["status"])
    return parent


def test_a_figure_that_cannot_be_drawn_leaves_the_rest_of_the_insight(tmp_path, monkeypatch):
    import optuna.visualization.matplotlib as ovm

    from platform import insight

    def no_variance(study):
        raise RuntimeError("Encountered zero total variance in all trees.")

    monkeypatch.setattr(ovm, "plot_param_importances", no_variance)  # what fANOVA may say of tied trials
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = fake_sweep(client, [{"lr": 1e-3, "value": 0.5, "status": "FINISHED"},
                                 {"lr": 2e-3, "value": 0.7, "status": "FINISHED"},
                                 {"lr": 3e-3, "value": 0.5, "status": "FINISHED"}])
    notes = insight.log_sweep_insight(client, parent, "auc_macro", "max")
    assert notes == ["param_importances.png: RuntimeError: Encountered zero total variance in all trees."]
    run = client.get_run(parent)
    assert run.data.params["train.lr"] == "0.002" and run.data.metrics["best/auc_macro"] == 0.7
    assert run.data.metrics["sweep/trials"] == 3 and run.data.metrics["sweep/complete"] == 3
    assert {a.path for a in client.list_artifacts(parent, "sweep")} == {"sweep/optimization_history.png",
                                                                        "sweep/parallel_coordinate.png"}


def test_insight_of_a_sweep_whose_trials_all_failed_says_why(tmp_path):
    from platform import insight

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = fake_sweep(client, [{"lr": 1e-2, "value": None, "status": "FAILED"},
                                 {"lr": 5e-3, "value": None, "status": "FAILED"}])
    notes = insight.log_sweep_insight(client, parent, "auc_macro", "max")
    assert len(notes) == 3 and all("needs" in n and "the sweep has 0" in n for n in notes)
    table = pd.read_csv(client.download_artifacts(parent, "trials.csv", str(tmp_path)))
    assert list(table["state"]) == ["FAILED", "FAILED"] and set(table["failure"]) == {
        "FloatingPointError: train/loss became nan"}
    run = client.get_run(parent)
    assert run.data.metrics["sweep/failed"] == 2 and "train.lr" not in run.data.params
    assert client.list_artifacts(parent, "sweep") == []


@pytest.mark.slow
def test_a_best_trial_stopped_before_its_end_gets_its_figures_at_the_sweeps_end(store):
    """The sweep's driver draws them (``log_best_model(with_views=True)``) when the trial could not."""
    from platform import tracking
    from platform.runner import log_best_model

    client = MlflowClient(store["uri"])
    best = parent_of(client, "cls").data.tags["platform.best_run_id"]
    folder = os.path.join(client.get_run(best).info.artifact_uri, "plots")
    for name in ("gradcam.png", "embeddings.png"):
        os.remove(os.path.join(folder, name))  # as if ASHA had stopped it: no figures, no tag
    client.delete_tag(best, tracking.VIEWS_TAG)
    cfg = config_lib.from_dict(config_lib.load_yaml(open(client.download_artifacts(best, "config.yaml",
                                                                                   str(store["folder"] / "t4"))).read()))
    task = registry.get("classification")
    log_best_model(client, best, cfg, task, task.build_data(cfg), register=False, with_views=True)
    assert client.get_run(best).data.tags[tracking.VIEWS_TAG] == "gradcam.png,embeddings.png"
    for name in ("gradcam.png", "embeddings.png"):
        assert_figure(client, best, f"plots/{name}")


def test_the_report_gives_each_metric_its_own_table(tmp_path):
    """mae_finetune optimises PSNR with head=superres and AUC with head=classification: never one column."""
    from platform import tracking

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    experiment = tracking.experiment_id(client, "deeplense-mae_finetune")
    for name, head, metric, value in (("sr", "superres", "psnr", 31.5), ("cls", "classification", "auc_macro", 0.81)):
        run = tracking.start_run(client, experiment, name, {tracking.TASK_TAG: "mae_finetune"})
        tracking.log_params(client, run, {"head": head, "train.epochs": 2, "data.preset": "model_ii",
                                          "data.num_train": 64, "data.num_val": 32})
        tracking.log_metrics(client, run, {f"val/{metric}": value, f"best/{metric}": value}, step=1)
        if head == "superres":  # a run with its test split scored; the other from before there were test splits
            tracking.log_metrics(client, run, {"test/psnr": 30.9}, step=0)
        tracking.end_run(client, run, "FINISHED")
    result = run_cli_here("platform.report", f"mlflow.tracking_uri=sqlite:///{db}", f"report.out={tmp_path / 'r'}",
                          cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "r" / "report.md").read_text()
    auc, psnr = text.index("## mae_finetune: auc_macro"), text.index("## mae_finetune: psnr")
    assert auc < psnr
    assert "| cls | train | not scored | 0.81 |" in text[auc:psnr] and "| sr | train | **30.9** | 31.5 |" in text[psnr:]
    assert "| sr |" not in text[auc:psnr] and "| cls |" not in text[psnr:]
    # Under each, the published numbers of that metric.
    assert "| 0.968 | macro one-vs-rest" in text[auc:psnr] and "| 33 | PSNR (dB)" in text[psnr:]
    assert "PSNR (dB)" not in text[auc:psnr]


def test_a_cnn_is_explained_at_its_deepest_stage_that_still_draws_a_map():
    import timm

    model = timm.create_model("resnet18", in_chans=1, num_classes=3)
    target = explain.timm_target(model)
    assert target.layers_for((64, 64)) == [model.layer2]  # 8x8; layer4 would be 2x2 quadrants
    assert target.layers_for((150, 150)) == [model.layer3]  # 9x9
    assert target.layers_for((256, 256)) == [model.layer4]  # 8x8
    assert target.layers_for((16, 16)) == [model.act1]  # nothing reaches 8x8: the finest stage there is
    assert explain.gradcam_maps(target, torch.rand(2, 1, 64, 64), np.array([0, 2])).shape == (2, 64, 64)
