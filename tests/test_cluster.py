"""Against a Ray cluster: workers import the project's `platform`; `ray job submit` runs a sweep."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT

pytestmark = pytest.mark.slow
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def test_train_workers_import_the_platform_package(tmp_path):
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from platform import cluster

    def report_where_platform_comes_from(config):
        import platform
        import platform.lensing  # noqa: F401  (a platform.* module, in a Ray Train worker)

        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
            json.dump({"file": platform.__file__, "system": platform.system(),
                       "pythonpath": os.environ.get("PYTHONPATH", "")}, f)

    cluster.connect()
    try:
        result = TorchTrainer(report_where_platform_comes_from, train_loop_config={"out": str(tmp_path)},
                              scaling_config=ray.train.ScalingConfig(num_workers=2)).fit()
    finally:
        ray.shutdown()
    assert result.error is None, result.error
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["file"] == os.path.join(ROOT, "platform", "__init__.py")
        assert seen["system"] == "Linux" and seen["pythonpath"].split(os.pathsep)[0] == ROOT


def test_workers_on_another_machine_get_the_project_shipped(tmp_path):
    # A cluster elsewhere cannot use this checkout's path: the project travels as the
    # runtime env's working_dir. Shown on a loopback Ray, as if it were remote.
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from platform import cluster

    def where_platform_comes_from(config):
        import platform
        import platform.lensing  # noqa: F401

        with open(os.path.join(config["out"], "seen.json"), "w") as f:
            json.dump({"file": platform.__file__, "system": platform.system()}, f)

    cluster._stay_on_loopback()
    ray.init(runtime_env=cluster.runtime_env(same_machine=False))
    try:
        result = TorchTrainer(where_platform_comes_from, train_loop_config={"out": str(tmp_path)},
                              scaling_config=ray.train.ScalingConfig(num_workers=1)).fit()
    finally:
        ray.shutdown()
    assert result.error is None, result.error
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["system"] == "Linux" and not seen["file"].startswith(ROOT)
    assert seen["file"].endswith(os.path.join("platform", "__init__.py"))


@pytest.mark.heavy
def test_ray_job_submit_runs_a_sweep_on_a_running_cluster(tmp_path, ray_head):
    """`ray job submit` to a head started apart with `ray start --head` (the session's), as a user
    submits to a workstation or a cluster's head node, token authentication included."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    dashboard = ray_head["dashboard"]
    # No tracking URI or storage path: the defaults must outlive the job's temporary working dir.
    # They go under $DEEPLENSE_HOME (else ~/deeplense), given here as the job's own environment.
    db = tmp_path / "home" / "mlflow.db"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", dashboard, "--working-dir", ".", "--no-wait",
         "--runtime-env-json", json.dumps({"env_vars": {"DEEPLENSE_HOME": str(tmp_path / "home")}}), "--",
         "python", "-m", "platform.tune", "task=mae", "tune.num_samples=1", "train.epochs=1", "tune.name=job-sweep",
         "scaling.num_workers=0",  # the job's path is the point here; Ray Train workers are tested elsewhere
         "model.depth=1", "model.embed_dim=32", "model.num_heads=2", f"data.cache_dir={tmp_path}/cache",
         "data.num_train=48", "data.num_val=30", "train.batch_size=16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = next(line.split("'")[1] for line in submit.stdout.splitlines() if "submitted successfully" in line)
    deadline, status = time.time() + 300, ""
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(2)
        out = subprocess.run([RAY, "job", "status", "--address", dashboard, job_id],
                             env=env, capture_output=True, text=True, timeout=60).stdout
        status = next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s in out.upper()), "")
    logs = subprocess.run([RAY, "job", "logs", "--address", dashboard, job_id],
                          env=env, capture_output=True, text=True, timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "1 trials (0 failed)" in logs and f"sqlite:///{db}" in logs
    assert (tmp_path / "home" / "ray_results" / "job-sweep" / "optuna.db").exists()
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("deeplense-mae").experiment_id])
    parent = [r for r in runs if r.data.tags.get("platform.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 1 and parent[0].info.status == "FINISHED"


@pytest.mark.own_ray
def test_ray_job_submit_as_users_type_it_with_the_readmes_token_steps(tmp_path):
    """The README's steps on a head a user started in the project folder, with nothing on its
    PYTHONPATH: `ray get-auth-token --generate`, `RAY_AUTH_MODE=token ray start --head`, then
    `RAY_AUTH_MODE=token ray job submit -- python -m platform.tune ...` without --working-dir.
    The driver finds the project where the job runs (the head's folder) and passes it to the
    trials' processes (and so to their Train workers')."""
    from benchmarks.common import start_head, stop_head

    home = tmp_path / "home"
    home.mkdir()
    user = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "DEEPLENSE_"))
            and k != "PYTHONPATH"}
    user.update(HOME=str(home), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    # The session's token is the one this process checks the head with; --generate keeps a token that exists.
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(os.environ["RAY_AUTH_TOKEN"])
    token = subprocess.run([RAY, "get-auth-token", "--generate"], env=user, capture_output=True, text=True, timeout=60)
    assert token.returncode == 0 and os.environ["RAY_AUTH_TOKEN"] in token.stdout, token.stderr
    user["RAY_AUTH_MODE"] = "token"
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    head = start_head(folder, user, num_cpus=2, takes_jobs=True, cwd=ROOT, log=str(tmp_path / "head.log"))
    try:
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", head["dashboard"], "--", "python", "-m", "platform.tune", "task=mae",
             # The trial's own process imports the platform as a Train worker's would (the same runtime env).
             "tune.num_samples=1", "train.epochs=1", "tune.name=plain-job", "scaling.num_workers=0",
             "model.depth=1", "model.embed_dim=32", "model.num_heads=2", f"data.cache_dir={tmp_path}/cache",
             "data.num_train=48", "data.num_val=30", "train.batch_size=16"],
            cwd=str(tmp_path), env=user, capture_output=True, text=True, timeout=400)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        assert "1 trials (0 failed)" in submit.stdout, submit.stdout[-4000:]
        assert "is not a package" not in submit.stdout + submit.stderr
    finally:
        stop_head(head)
        shutil.rmtree(folder, ignore_errors=True)


def test_trials_that_cannot_import_the_platform_end_the_sweep_with_the_command_to_use(monkeypatch):
    # `ray job submit` without --working-dir to a cluster whose other nodes lack the project: every
    # trial fails on its import; the sweep's last line says how to submit it instead.
    from platform import provenance
    from platform.tune import no_trial_finished

    monkeypatch.setattr(provenance, "invoked", ["python", "-m", "platform.tune", "task=mae"])
    line = no_trial_finished("s", "val/loss", ["ModuleNotFoundError: No module named 'platform.config'; "
                                               "'platform' is not a package"])
    assert line.endswith("submit it from your checkout with `ray job submit --working-dir . -- python -m "
                         "platform.tune task=mae`") and "\n" not in line
    assert "tune.resume=force" in no_trial_finished("s", "val/loss", ["FloatingPointError: train/loss became nan"])


def test_every_trials_epoch_lines_reach_the_console_unfolded(monkeypatch):
    # Ray folds lines from different processes that differ only in numbers into one
    # "[repeated Nx]" line: trial B's "epoch 2/2" vanished behind trial A's "epoch 1/2".
    from ray._private import ray_logging

    from platform.cluster import keep_run_lines

    monkeypatch.delenv("RAY_DEDUP_LOGS_ALLOW_REGEX", raising=False)
    for deduplicator in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        monkeypatch.setattr(deduplicator, "allow_re", deduplicator.allow_re)
        monkeypatch.setattr(deduplicator, "recent", {})
    keep_run_lines()
    lines = {(pid, epoch): f"[classification] epoch {epoch}/2  3.1 steps/s  train/loss 1.0{pid}  val/auc_macro 0.5{epoch}"
             for epoch in (1, 2) for pid in (11, 12, 13)}
    printed = []
    for (pid, epoch), line in lines.items():
        batch = {"ip": "127.0.0.1", "pid": pid, "job": "01", "is_err": False, "lines": [line], "actor_name": "run_trial"}
        printed += [line for out in ray_logging.stdout_deduplicator.deduplicate(batch) for line in out["lines"]]
    printed += [line for out in ray_logging.stdout_deduplicator.flush() for line in out["lines"]]
    assert printed == list(lines.values())
    ray_repeats = ray_logging.stdout_deduplicator.deduplicate(
        {"ip": "127.0.0.1", "pid": 14, "job": "01", "is_err": False, "lines": ["Checkpoint created at 0001"]})
    assert ray_repeats[0]["lines"] == ["Checkpoint created at 0001"]  # Ray's own lines are still Ray's to fold


def test_the_address_file_of_a_dead_local_ray_is_ignored(tmp_path, monkeypatch):
    # A local Ray killed without cleaning up leaves its address behind: the next command started
    # a new local Ray only after ray.init had waited minutes for the dead one.
    from platform import cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # nothing listens on port 1
    assert cluster.target_address("") is None


# What decides a sweep's concurrency on cluster.yaml's cluster: the nodes its autoscaler may add, not
# the none that are up when the sweep starts; the roomiest types first, within its max_workers.
def test_a_sweep_on_cluster_yaml_asks_for_as_many_trials_as_the_cluster_can_grow_to_hold():
    import yaml

    from platform import cluster, config

    spec = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    types = lambda: list(cluster.node_types_of(spec).values())  # noqa: E731
    assert spec["max_workers"] == 16 and {t.name: t.max_nodes for t in types()} == {
        "head": 1, "gpu_spot": 16, "gpu_spot_large": 4}

    one_gpu = config.build("mae", [{"scaling.use_gpu": True, "scaling.num_workers": 0}]).scaling
    capacity = cluster.capacity_of(one_gpu, types(), spec)
    assert capacity.trials == 4 * 4 + 12 * 1  # 4 g5.12xlarge (4 GPUs each), then 12 g5.2xlarge of the 16 nodes
    assert capacity.reason == ("up to 28 trials at once (1 GPU, 1 CPU each): 4 x gpu_spot_large (4 GPUs, 48 CPUs), "
                               "12 x gpu_spot (1 GPU, 8 CPUs); 0 up now, the autoscaler adds them")
    ddp = config.build("mae", [{"scaling.use_gpu": True, "scaling.num_workers": 4}]).scaling
    assert cluster.capacity_of(ddp, types(), spec).trials == 7
    assert cluster.capacity_of(one_gpu, types(), spec, fixed=3).reason.startswith("3 trials at once (tune.max_concurrent")

    too_big = config.build("mae", [{"scaling.use_gpu": True, "scaling.gpus_per_worker": 8}]).scaling
    with pytest.raises(config.ConfigError, match=r"needs 8 GPUs, 1 CPU .* no node type of its autoscaler has that "
                                                 r"much \(the largest: 4 GPUs, 48 CPUs\)"):
        cluster.capacity_of(too_big, types(), spec)

    # A laptop: both its CPUs train when the splits sit in the object store; one is kept for Ray Data's
    # read tasks when a split streams.
    laptop = [cluster.NodeType("local", {"CPU": 2}, 1, up=1)]
    one_cpu = config.build("mae", []).scaling
    assert cluster.capacity_of(one_cpu, laptop, None, reads_data=False).reason == \
        "up to 2 trials at once (1 CPU each): 1 node (2 CPUs)"
    assert cluster.capacity_of(one_cpu, laptop, None, reads_data=True).trials == 1


def test_a_sweeps_cost_sums_its_trials_node_time_at_cost_hourly_or_list_prices():
    from platform import cluster, cost

    spot = cluster.NodeType("gpu_spot", {"CPU": 8, "GPU": 1}, 16, instance="g5.2xlarge", spot=True)
    trials = [{"cost/node_seconds/gpu_spot": 1800.0, "cost/gpu_seconds": 1800.0},
              {"cost/node_seconds/gpu_spot": 3600.0, "cost/node_seconds/head": 36.0, "cost/gpu_seconds": 3600.0}]
    totals = cost.sweep_totals(trials, {"head": 0.4}, {"gpu_spot": spot})
    assert totals["cost/node_hours/gpu_spot"] == 1.5 and totals["cost/gpu_hours"] == 1.5
    assert totals["cost/usd"] == pytest.approx(1.5 * cost.LIST_PRICES[("g5.2xlarge", "spot")] + 0.01 * 0.4)
    assert cost.sweep_totals(trials, {"gpu_spot": 1.0, "head": 0.0})["cost/usd"] == 1.5
    unpriced = cost.sweep_totals(trials, {})  # head has no price: node-hours, no dollars
    assert "cost/usd" not in unpriced and "no estimate in dollars" in cost.describe(unpriced)
