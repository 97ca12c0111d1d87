"""Several Ray nodes on this machine (ray.cluster_utils.Cluster, all on 127.0.0.1): a run spread
over two nodes, trial drivers pinned to the head by a custom resource, a Train worker killed
mid-run and the run resumed from its last checkpoint, as one MLflow run; concurrent trials
writing to one real MLflow server, every step counted."""

import os
import re
import signal
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, start_cli, tiny

pytestmark = pytest.mark.slow

MAE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1"]


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    # The head advertises trial_driver (as cluster.yaml's does); the second node is a plain
    # worker, like a spot GPU node.
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "resources": {"trial_driver": 1000}})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    head, worker = cluster.list_all_nodes()
    yield {"address": cluster.address, "head": head.node_id, "worker": worker.node_id}
    cluster.shutdown()


def test_a_two_worker_trial_spreads_over_two_nodes_with_its_driver_on_the_head(tmp_path, two_nodes):
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.tune", "task=mae", "tune.num_samples=1", "train.epochs=1", "tune.name=spread",
                     f"ray.address={two_nodes['address']}", "scaling.num_workers=2",
                     "scaling.placement_strategy=STRICT_SPREAD", *MAE, *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "1 trials (0 failed)" in result.stdout

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-mae").experiment_id
    (trial,) = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    ranks = trial.data.tags["platform.worker_nodes"].split(",")
    assert len(ranks) == 2 and set(ranks) == {two_nodes["head"], two_nodes["worker"]}  # one worker per node
    assert trial.data.tags["platform.driver_node"] == two_nodes["head"]  # placed by trial_driver


def train_workers() -> list[int]:
    """PIDs of this machine's Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if entry.isdigit() and title.startswith("ray::RayTrainWorker"):
            found.append(int(entry))
    return found


def test_a_killed_worker_resumes_from_the_last_checkpoint_as_one_run(tmp_path, two_nodes):
    db = tmp_path / "mlflow.db"
    epochs = 8  # epochs of ~2 s: room to kill a worker mid-run
    process = start_cli("platform.train", "task=mae", f"train.epochs={epochs}", "train.name=survivor",
                        "train.max_failures=1", f"ray.address={two_nodes['address']}", "scaling.num_workers=2",
                        *MAE, *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    try:
        client = MlflowClient(f"sqlite:///{db}")
        deadline, run_id, logged = time.time() + 300, None, []
        # Epoch N is logged just before it is reported with its checkpoint, so once epoch 2 is logged the
        # checkpoint of epoch 1 is committed and a restart must resume from it.
        while time.time() < deadline and len(logged) < 2:
            time.sleep(1)
            try:
                experiment = client.get_experiment_by_name("deeplense-mae")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
            except Exception:  # the store is still being created
                continue
            if runs:
                run_id = runs[0].info.run_id
                logged = client.get_metric_history(run_id, "epoch")
        assert len(logged) >= 2, "two epochs were not logged in time"
        pids = [int(p) for p in client.get_run(run_id).data.tags["platform.worker_pids"].split(",")]
        assert len(pids) == 2 and set(pids) <= set(train_workers()), (pids, train_workers())
        os.kill(pids[1], signal.SIGKILL)  # rank 1's process
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-4000:]

    resumed = [int(m) for m in re.findall(r"resuming from epoch (\d+)", output)]
    assert len(resumed) == 1 and 1 <= resumed[0] < epochs, output[-4000:]
    for epoch in range(1, resumed[0] + 1):  # the checkpointed epochs were not trained again
        assert len(re.findall(rf"\[mae\] epoch {epoch}/{epochs} ", output)) == 1, (epoch, output[-4000:])

    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-mae").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == run_id
    for metric in ("epoch", "val/loss", "train/loss"):
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), (metric, steps)  # every epoch, once


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback with a database behind it, as cluster.yaml's head runs one."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("mlflow server did not come up")
    yield url
    server.terminate()
    server.wait(timeout=60)


def test_concurrent_trials_lose_no_metric_on_one_tracking_server(tmp_path, two_nodes, mlflow_server):
    epochs, samples = 2, 2
    result = run_cli("platform.tune", "task=mae", f"tune.num_samples={samples}", "tune.max_concurrent=2",
                     "tune.scheduler=none", f"train.epochs={epochs}", "tune.name=crowd",
                     f"ray.address={two_nodes['address']}", *MAE, *tiny(tmp_path / "cache", tmp_path / "unused.db"),
                     f"mlflow.tracking_uri={mlflow_server}", cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"{samples} trials (0 failed)" in result.stdout

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("deeplense-mae").experiment_id
    trials = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == samples and all(t.info.status == "FINISHED" for t in trials)
    spans = sorted((t.info.start_time, t.info.end_time) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # they did overlap
    for trial in trials:
        for metric in trial.data.metrics:
            if metric.startswith(("val/", "train/", "best/")) or metric == "epoch":
                steps = [m.step for m in client.get_metric_history(trial.info.run_id, metric)]
                assert sorted(steps) == list(range(1, epochs + 1)), (trial.info.run_name, metric, steps)
