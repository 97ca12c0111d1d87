"""A sweep on an autoscaling cluster, as `ray up cluster.yaml` runs one: Ray's own autoscaler, here with
its fake multi-node provider, which starts worker nodes as local processes on 127.0.0.1. The head holds
the trial drivers (``trial_driver``) and no CPU to train on; the one worker type starts at zero nodes,
may grow to three, and its nodes go away when idle. The sweep must ask for as many trials at once as
the cluster can grow to hold, bring it up to three nodes, survive losing one, say what it spent, and
leave the cluster empty again."""

import json
import os
import re
import signal
import sys
import tempfile
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from benchmarks.common import free_ports, start_head, stop_head
from tests.helpers import run_cli, start_cli, tiny

pytestmark = [pytest.mark.slow, pytest.mark.own_ray, pytest.mark.heavy]

WORKER_TYPE, MOST_NODES = "cpu_worker", 3
MAE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1"]


def autoscaling_config(gcs_port: int) -> dict:
    """What `ray up` hands the head's autoscaler (~/ray_bootstrap_config.yaml), for the fake provider."""
    return {
        "cluster_name": "autoscaling-test", "max_workers": MOST_NODES, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # 6 s, where cluster.yaml has 10 minutes
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "launch_multiple": True,
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0, "trial_driver": 1000}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": MOST_NODES},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def cluster():
    """{"address", "folder"} of a head whose autoscaler adds and removes worker nodes."""
    folder = tempfile.mkdtemp(prefix="ah", dir="/tmp")  # Ray's socket paths stay under 108 bytes
    (port,) = free_ports(1)
    config = os.path.join(folder, "autoscaling.json")
    with open(config, "w") as f:
        json.dump(autoscaling_config(port), f)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           # A lost node is found dead in 2 s, not 15, and replaced after 5 s without heartbeats, not 30.
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "2",
           "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5"}
    head = start_head(folder, env, num_cpus=0, log=os.path.join(folder, "head.log"), port=port,
                      extra_args=('--resources={"trial_driver": 1000}', f"--autoscaling-config={config}"))
    yield {"address": head["address"], "folder": folder}
    stop_head(head)
    for process in psutil.process_iter(["cmdline"]):  # worker nodes the autoscaler still had
        if any(f"--gcs-address={head['address']}" in arg for arg in process.info["cmdline"] or []):
            process.kill()


def nodes(address: str) -> dict[str, bool]:
    """Every worker node the cluster has had: {node id: alive}."""
    from ray._raylet import GcsClient

    info = GcsClient(address=address).get_all_node_info(timeout=10)
    return {node_id.hex(): node.state == 0 for node_id, node in info.items()
            if "node:__internal_head__" not in dict(node.resources_total)}


def most_at_once(runs) -> int:
    """The most runs whose start-to-end spans overlap."""
    edges = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def sweep_runs(client, name: str):
    experiment = client.get_experiment_by_name("deeplense-mae").experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.`platform.sweep` = '{name}'")
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in found if "mlflow.parentRunId" in r.data.tags]


def args(tmp_path, cluster, name: str, *extra: str) -> list[str]:
    return ["task=mae", f"tune.name={name}", "tune.num_samples=6", "tune.scheduler=none", "tune.search=random",
            f"ray.address={cluster['address']}", "mlflow.register_model=false", "plots.gradcam=false",
            "plots.embeddings=false", f"cost.hourly.{WORKER_TYPE}=0.5", "train.checkpoint_every=1", *MAE,
            *tiny(tmp_path / "cache", tmp_path / "mlflow.db"), *extra]


def assert_scaled_out_and_back(client, cluster, name: str, output: str, epochs: int) -> list:
    assert f"up to {MOST_NODES} trials at once" in output and f"{MOST_NODES} x {WORKER_TYPE}" in output, output[-3000:]
    (parent,), trials = sweep_runs(client, name)
    assert [t.info.status for t in trials] == ["FINISHED"] * 6
    assert all(t.data.metrics["epoch"] == epochs for t in trials)
    assert most_at_once(trials) == MOST_NODES  # three trials at once, never more
    # What it spent: each trial on the worker type; the parent's sums, and the dollars at 0.5 an hour.
    assert {t.data.tags["platform.node_types"] for t in trials} == {WORKER_TYPE}
    node_seconds = sum(t.data.metrics[f"cost/node_seconds/{WORKER_TYPE}"] for t in trials)
    spans = sum(t.info.end_time - t.info.start_time for t in trials) / 1000
    # One whole 1-CPU node per trial while it ran, and never more than the three nodes for the sweep.
    assert 0.7 * spans < node_seconds < MOST_NODES * (parent.info.end_time - parent.info.start_time) / 1000
    hours = parent.data.metrics[f"cost/node_hours/{WORKER_TYPE}"]
    assert hours == pytest.approx(node_seconds / 3600)
    assert parent.data.metrics["cost/usd"] == pytest.approx(0.5 * hours)
    assert parent.data.metrics["cost/gpu_hours"] == 0
    assert "cost: 0 GPU-hours; node-hours: cpu_worker" in output
    # Back to zero worker nodes once idle.
    deadline = time.time() + 90
    while any(nodes(cluster["address"]).values()) and time.time() < deadline:
        time.sleep(1)
    assert not any(nodes(cluster["address"]).values()), "the autoscaler kept idle worker nodes"
    return trials


# Trials on Ray Train workers; one worker node killed outright (a spot instance taken back) while a
# trial on it is part-way, past its first checkpoint: the autoscaler replaces the node, and the trial
# goes on from its checkpoint on shared storage (one disk here, object storage on a cloud).
@pytest.mark.long
def test_a_sweep_scales_out_to_three_nodes_survives_losing_one_and_scales_back_to_zero(tmp_path, cluster):
    epochs = 6
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    driver = start_cli("platform.tune", *args(tmp_path, cluster, "spot", f"train.epochs={epochs}", "data.num_train=160",
                                              "scaling.num_workers=1", "train.max_failures=2"), cwd=str(tmp_path))
    try:
        victim, deadline = None, time.time() + 400
        while victim is None and time.time() < deadline and driver.poll() is None:
            time.sleep(0.3)
            try:
                _, trials = sweep_runs(client, "spot")
            except Exception:  # no experiment yet
                continue
            for t in trials:
                snapshot = tmp_path / "ray_results" / f"spot-{t.data.tags['platform.trial_id']}" / \
                    "checkpoint_manager_snapshot.json"
                if (t.info.status == "RUNNING" and t.data.metrics.get("epoch", epochs) <= epochs - 3
                        and snapshot.exists() and '"latest_checkpoint_result": null' not in snapshot.read_text()):
                    victim = t
                    break
        assert victim is not None, driver.communicate(timeout=60)[0][-3000:] if driver.poll() is not None else "no trial checkpointed"
        killed_node, first_pid = victim.data.tags["platform.worker_nodes"], victim.data.tags["platform.worker_pids"]
        raylets = [p for p in psutil.process_iter(["cmdline"])
                   if f"--node_id={killed_node}" in (p.info["cmdline"] or [])
                   and f"--gcs-address={cluster['address']}" in (p.info["cmdline"] or [])]
        assert len(raylets) == 1
        raylets[0].send_signal(signal.SIGKILL)  # the node is gone, its workers with it
        output, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, output[-4000:]
    trials = assert_scaled_out_and_back(client, cluster, "spot", output, epochs)
    # The autoscaler replaced the lost node: a fourth worker node, the killed one dead.
    everyone = nodes(cluster["address"])
    assert everyone[killed_node] is False and len(everyone) >= MOST_NODES + 1
    (resumed,) = [t for t in trials if t.info.run_id == victim.info.run_id]
    assert resumed.data.tags["platform.worker_nodes"] != killed_node
    # It went on from its checkpoint: its new worker trained only the epochs after it. (Every node
    # here shares one log folder, so each line reaches the driver once per node: count distinct ones.)
    second_pid = resumed.data.tags["platform.worker_pids"]
    resumed_from = {int(e) for e in re.findall(rf"pid={second_pid}\).*resuming from epoch (\d+)", output)}
    assert len(resumed_from) == 1 and 1 <= min(resumed_from) < epochs, output[-4000:]
    trained = {(pid, int(k)) for pid, k in re.findall(r"pid=(\d+)\)\S* \[mae\] epoch (\d+)/", output)}
    assert sorted(k for pid, k in trained if pid == second_pid) == list(range(min(resumed_from) + 1, epochs + 1))
    assert sorted(k for pid, k in trained if pid == first_pid) == list(range(1, len(
        [k for pid, k in trained if pid == first_pid]) + 1))


# Trials in their own process: the trial itself needs the worker type's CPU.
@pytest.mark.long
def test_a_sweep_of_trials_in_their_own_process_scales_out_and_back(tmp_path, cluster):
    epochs = 2
    # A trial that no node type could ever hold: one line, before any run or node starts.
    refused = run_cli("platform.tune", *args(tmp_path, cluster, "gpus", "scaling.use_gpu=true", "scaling.num_workers=0"),
                      cwd=str(tmp_path))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-3000:]
    assert refused.stderr.startswith("error: a trial's worker needs 1 GPU, 1 CPU") and "no node type of its " \
        "autoscaler has that much (the largest: 1 CPU)" in refused.stderr
    store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not store.search_runs([e.experiment_id for e in store.search_experiments()])
    assert not any(nodes(cluster["address"]).values())

    result = run_cli("platform.tune", *args(tmp_path, cluster, "inproc", f"train.epochs={epochs}",
                                            "scaling.num_workers=0"), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert_scaled_out_and_back(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), cluster, "inproc",
                               result.stdout, epochs)
