"""Several Ray nodes on this machine (ray.cluster_utils.Cluster, all on 127.0.0.1): runs spread
over two nodes, trial drivers pinned to the head by a custom resource, a Train worker killed
mid-run (SIGTERM: a checkpoint at the next step; SIGKILL: the last epoch's) and a node drained
for preemption and replaced, each run resumed where it stopped as one MLflow run; concurrent trials
writing to one real MLflow server, every step counted."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port, run_cli, start_cli, tiny

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]  # each builds its own several-node cluster

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


def wait_for(what: str, check, timeout: float = 300):
    """Poll ``check()`` every second until it returns something true; that value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(1)
        try:
            value = check()
        except Exception:  # the store is still being created
            continue
        if value:
            return value
    raise AssertionError(f"timed out waiting for {what}")


def logged_epochs_and_pids(client, at_least: int, not_pids=()):
    """(run id, worker pids by rank) once the only run has logged ``at_least`` epochs with workers not in ``not_pids``."""
    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-mae").experiment_id])
    pids = [int(p) for p in run.data.tags.get("platform.worker_pids", "").split(",") if p]
    if len(client.get_metric_history(run.info.run_id, "epoch")) >= at_least and pids and not set(pids) & set(not_pids):
        return run.info.run_id, pids
    return None


def latest_checkpoint(storage) -> str | None:
    """The checkpoint Ray Train restarts a run from now: the latest its controller registered (its
    snapshot in the run's storage). A reported checkpoint counts once every rank's report of it is in."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


def events(output: str) -> str:
    """The lines of a run's output that tell its failures and resumes apart."""
    wanted = ("resuming", "preemption", "SIGTERM", "Preempted", "drain", "Drain", "failed", "died", "epoch ")
    return "\n".join(line for line in output.splitlines() if any(w in line for w in wanted))[-12000:]


@pytest.mark.heavy
@pytest.mark.long
def test_a_sigtermed_then_a_killed_worker_resume_where_they_stopped_as_one_run(tmp_path, two_nodes):
    """A spot VM's SIGTERM: a checkpoint at the next step, the run resumes at that step. Then a
    SIGKILL (no warning): the run resumes from its last epoch's checkpoint. One MLflow run throughout."""
    db, storage = tmp_path / "mlflow.db", tmp_path / "ray_results" / "survivor"
    epochs = 20  # epochs of under a second: room for two failures
    process = start_cli("platform.train", "task=mae", f"train.epochs={epochs}", "train.name=survivor",
                        "train.checkpoint_every=1",  # an epoch checkpoint to fall back on after the SIGKILL
                        "train.max_failures=2", "train.preemption_check_steps=1",
                        f"ray.address={two_nodes['address']}", "scaling.num_workers=2",
                        *MAE, *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    try:
        client = MlflowClient(f"sqlite:///{db}")
        # Epoch N is logged just before it is reported with its checkpoint: once epoch 2 is
        # logged, epoch 1's checkpoint is committed.
        run_id, pids = wait_for("two epochs", lambda: logged_epochs_and_pids(client, 2))
        assert len(pids) == 2 and set(pids) <= set(train_workers()), (pids, train_workers())
        os.kill(pids[1], signal.SIGTERM)  # rank 1, as a spot VM's shutdown would
        stopped_at = int(wait_for("the SIGTERM's checkpoint", lambda: re.fullmatch(
            r"epoch-(\d{4})-step-\d+", latest_checkpoint(storage) or "")).group(1))
        # The restarted workers (new pids) train on. Once Ray has registered one of their epoch
        # checkpoints (it lags the epochs logged: a round counts once every rank's report is in),
        # rank 0 is killed outright.
        _, new_pids = wait_for("the restarted workers", lambda: logged_epochs_and_pids(client, 5, not_pids=pids))
        registered = int(wait_for("an epoch checkpoint of the restarted workers", lambda: (
            (m := re.fullmatch(r"epoch-(\d{4})", latest_checkpoint(storage) or "")) and int(m.group(1)) > stopped_at
            and m)).group(1))
        assert process.poll() is None, "the run ended before its second failure"
        os.kill(new_pids[0], signal.SIGKILL)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    (tmp_path / "output.log").write_text(output)
    assert process.returncode == 0, output[-4000:]

    resumed = re.findall(r"resuming from epoch (\d+)(?: step (\d+))?", output)
    assert len(resumed) == 2, output[-4000:]
    (after_sigterm, at_step), (after_kill, no_step) = [(int(e), int(s or 0)) for e, s in resumed]
    assert at_step > 0 and after_sigterm == stopped_at
    assert f"checkpoint saved in epoch {after_sigterm + 1} at step {at_step}" in output
    # A SIGKILL saves nothing: the run resumes from the last epoch checkpoint Ray registered.
    assert no_step == 0 and stopped_at < registered <= after_kill < epochs, (registered, events(output))
    for epoch in range(1, after_kill + 1):  # nothing before the last checkpoint was trained twice
        assert len(re.findall(rf"\[mae\] epoch {epoch}/{epochs} ", output)) == 1, (epoch, output[-4000:])

    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-mae").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == run_id
    for metric in ("epoch", "val/loss", "train/loss"):
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), (metric, steps)  # every epoch, once


@pytest.mark.heavy
@pytest.mark.long
def test_a_node_drained_for_preemption_hands_its_run_to_a_new_node(tmp_path, monkeypatch):
    """The autoscaler's spot reclaim: the node is drained with a deadline (``ray drain-node``), the
    workers checkpoint at once, the deadline passes and the node is gone; the run continues on a
    new node from that step, counted as a preemption (train.max_failures stays 0)."""
    from ray.cluster_utils import Cluster

    for name, value in {"health_check_period_ms": "500", "health_check_failure_threshold": "3",
                        "health_check_initial_delay_ms": "0", "TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}.items():
        monkeypatch.setenv(f"RAY_{name}", value)  # a drain and a vanished node noticed in seconds
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    spot = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    # Enough epochs that the run is still training when the node vanishes (deadline_s after the
    # drain): at 1 to 2 s an epoch on 2 cores, 9 epochs could all finish inside the deadline, and then
    # there is no restart to check.
    db, epochs, deadline_s = tmp_path / "mlflow.db", 24, 15
    process = start_cli("platform.train", "task=mae", f"train.epochs={epochs}", "train.name=drained",
                        "train.checkpoint_every=1",
                        "train.preemption_check_steps=1", "scaling.placement_strategy=STRICT_SPREAD",
                        f"ray.address={cluster.address}", "scaling.num_workers=2",
                        *MAE, *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    try:
        client = MlflowClient(f"sqlite:///{db}")
        run_id, _ = wait_for("two epochs", lambda: logged_epochs_and_pids(client, 2))
        drain = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node",
                                f"--address={cluster.address}", f"--node-id={spot.node_id}",
                                "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim",
                                f"--deadline-remaining-seconds={deadline_s}"], capture_output=True, text=True, timeout=120)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        drained_at = time.time()
        results = tmp_path / "ray_results" / "drained"
        wait_for("a checkpoint taken on the drain notice", lambda: list(results.glob("epoch-*-step-*")), timeout=deadline_s)
        replacement = cluster.add_node(num_cpus=2)  # the autoscaler's new node
        time.sleep(max(0.0, drained_at + deadline_s + 1 - time.time()))
        cluster.remove_node(spot, allow_graceful=False)  # the reclaimed VM vanishes
        output, _ = process.communicate(timeout=600)
    except AssertionError as error:
        process.kill()
        raise AssertionError(f"{error}\n{process.communicate()[0][-6000:]}") from None
    finally:
        if process.poll() is None:
            process.kill()
        cluster.shutdown()
    assert process.returncode == 0, output[-4000:]

    saved = re.search(r"preemption warning \(drain\): checkpoint saved in epoch (\d+) at step (\d+)", output)
    assert saved, output[-4000:]
    # The run trains on after its warning; the restart takes the latest checkpoint: that one, or
    # an epoch's saved after it.
    (resumed,) = re.findall(r"resuming from epoch (\d+)(?: step (\d+))?", output)
    at = (int(resumed[0]), int(resumed[1] or 0))
    assert at == (int(saved[1]) - 1, int(saved[2])) or at[0] >= int(saved[1]), (at, saved[0])
    for epoch in range(1, at[0] + 1):  # nothing before it trained twice
        assert len(re.findall(rf"\[mae\] epoch {epoch}/{epochs} ", output)) == 1, (epoch, output[-4000:])
    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-mae").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == run_id
    assert replacement.node_id in run.data.tags["platform.worker_nodes"].split(",")
    steps = [m.step for m in client.get_metric_history(run_id, "epoch")]
    assert sorted(steps) == list(range(1, epochs + 1)), steps


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback with a database behind it, as cluster.yaml's head runs one."""
    import urllib.request

    port = free_port()
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


@pytest.mark.heavy
@pytest.mark.long
def test_concurrent_two_node_trials_lose_no_metric_on_one_tracking_server(tmp_path, two_nodes, mlflow_server):
    """Two trials at once, each a two-worker run spread over both nodes with its driver on the
    head (placed by trial_driver), all writing to one real MLflow server: every step lands."""
    epochs, samples = 2, 2
    result = run_cli("platform.tune", "task=mae", f"tune.num_samples={samples}", "tune.max_concurrent=2",
                     "tune.scheduler=none", f"train.epochs={epochs}", "tune.name=crowd",
                     "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=STRICT_SPREAD",
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
        ranks = trial.data.tags["platform.worker_nodes"].split(",")
        assert len(ranks) == 2 and set(ranks) == {two_nodes["head"], two_nodes["worker"]}  # one worker per node
        assert trial.data.tags["platform.driver_node"] == two_nodes["head"]  # placed by trial_driver
        for metric in trial.data.metrics:
            if metric.startswith(("val/", "train/", "best/")) or metric == "epoch":
                steps = [m.step for m in client.get_metric_history(trial.info.run_id, metric)]
                assert sorted(steps) == list(range(1, epochs + 1)), (trial.info.run_name, metric, steps)


@pytest.mark.heavy
@pytest.mark.long
def test_small_trials_share_one_gpu(tmp_path):
    """scaling.gpus_per_worker=0.25 on a Ray that advertises one GPU: four in-process trials are
    placed on it at once (the count follows: 4, not 1), each MLflow run overlapping the others.
    This machine has no CUDA device, so each trains on its CPU share; the placement is the point."""
    from ray.cluster_utils import Cluster

    from tests.test_autoscaling import most_at_once

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "num_gpus": 1, "resources": {"trial_driver": 1000}})
    try:
        db = tmp_path / "mlflow.db"
        result = run_cli("platform.tune", "task=mae", "tune.num_samples=4", "tune.scheduler=none", "train.epochs=6",
                         "tune.name=shared-gpu", "scaling.use_gpu=true", "scaling.gpus_per_worker=0.25",
                         "scaling.cpus_per_worker=0.5", f"ray.address={cluster.address}", *MAE,
                         *tiny(tmp_path / "cache", db, "data.num_train=256", "mlflow.register_model=false"),
                         cwd=str(tmp_path))
    finally:
        cluster.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "up to 4 trials at once (0.25 GPUs, 0.5 CPUs each)" in result.stdout, result.stdout[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-mae").experiment_id
    trials = [r for r in client.search_runs([experiment]) if "platform.trial_id" in r.data.tags]
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    assert most_at_once(trials) == 4, [(t.info.start_time, t.info.end_time) for t in trials]
    assert {t.data.params["scaling.gpus_per_worker"] for t in trials} == {"0.25"}
