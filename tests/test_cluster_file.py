"""cluster.yaml through Ray's own autoscaler validator (offline) and the platform's rules, as
`python -m platform.cluster cluster.yaml` checks it; and the KubeRay RayJob beside it."""

import copy
import os

import pytest
import yaml

from tests.helpers import run_cli, run_cli_here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster.yaml")


def load() -> dict:
    with open(CLUSTER) as f:
        return yaml.safe_load(f)


def check(tmp_path, config: dict):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_cli_here("platform.cluster_file", str(path), cwd=str(tmp_path))  # python -m platform.cluster runs its main


def test_the_shipped_cluster_file_is_valid(tmp_path):
    result = run_cli("platform.cluster", CLUSTER, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "valid (Ray's validator and the platform's rules)" in result.stdout
    assert "gpu_spot (0..16)" in result.stdout


def _head_start(config, old, new):
    config["head_start_ray_commands"] = [c.replace(old, new) for c in config["head_start_ray_commands"]]


def _open_port(config):
    config["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 5000, "ToPort": 5000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]


MISTAKES = {
    # Ray's validator: its schema and its cross-field checks.
    "a misspelt key": (lambda c: c["available_node_types"]["gpu_spot"].update(min_wokers=0),
                       "Ray's validator: Additional properties are not allowed ('min_wokers' was unexpected)"),
    "a head type that is not defined": (lambda c: c.update(head_node_type="cpu_head"),
                                        "Ray's validator: `head_node_type` must be one of `available_node_types`"),
    "more minimum workers than the cluster maximum": (
        lambda c: (c.update(max_workers=1), c["available_node_types"]["gpu_spot"].update(min_workers=2)),
        "Ray's validator: The specified global `max_workers` is smaller"),
    "a resource that is not a number": (lambda c: c["available_node_types"]["gpu_spot"].update(resources={"GPU": "1"}),
                                        "Ray's validator: '1' is not of type 'integer'"),
    # The platform's rules.
    "an MLflow server on every interface": (
        lambda c: _head_start(c, '--host "$(hostname -I | awk \'{print $1}\')"', "--host 0.0.0.0"),
        "mlflow server --host 0.0.0.0 listens on every interface"),
    "an MLflow server without a database": (
        lambda c: _head_start(c, "--backend-store-uri postgresql+psycopg://mlflow@127.0.0.1:5432/mlflow",
                              "--backend-store-uri ./mlruns"),
        "mlflow server --backend-store-uri ./mlruns is no database"),
    "MLflow artifacts on the head's disk": (
        lambda c: _head_start(c, "--artifacts-destination s3://YOUR-BUCKET/deeplense/mlflow-artifacts",
                              "--artifacts-destination /home/ubuntu/artifacts"),
        "mlflow server keeps artifacts at /home/ubuntu/artifacts; expected object storage"),
    "a public dashboard": (lambda c: _head_start(c, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
                           "ray start --dashboard-host=0.0.0.0 exposes the dashboard and job API"),
    "an on-demand GPU worker": (
        lambda c: c["available_node_types"]["gpu_spot"]["node_config"].pop("InstanceMarketOptions"),
        "available_node_types.gpu_spot.node_config.InstanceMarketOptions.MarketType is unset; worker types run on spot"),
    "idle GPUs kept warm": (lambda c: c["available_node_types"]["gpu_spot"].update(min_workers=2),
                            "available_node_types.gpu_spot.min_workers=2; expected 0"),
    "a spot head": (lambda c: c["available_node_types"]["head"]["node_config"].update(
        InstanceMarketOptions={"MarketType": "spot"}), "available_node_types.head is the head but asks for spot"),
    "a port open to the internet": (_open_port, "opens ports 5000-5000 to the internet; only SSH (22) may be"),
    "checkpoints on a node's disk": (
        lambda c: c.update(setup_commands=[s for s in c["setup_commands"] if "DEEPLENSE_RESULTS" not in s]),
        "setup_commands set no DEEPLENSE_RESULTS on object storage"),
    # Secrets: none written in the file, an MLflow server that requires a login the workers get.
    "a database password written in SQL": (
        lambda c: _head_setup(c, "PASSWORD '$(cat ~/.mlflow/db_password)'", "PASSWORD 'mlflow'"),
        "a PASSWORD '...' statement written in the file; generate it at set-up"),
    "a password in the backend store's URI": (
        lambda c: _head_start(c, "postgresql+psycopg://mlflow@127.0.0.1", "postgresql+psycopg://mlflow:mlflow@127.0.0.1"),
        "a password in a URI written in the file; generate it at set-up"),
    "a password flag": (lambda c: c["head_setup_commands"].append("mysqladmin -u mlflow --password=hunter2 status"),
                        "a --password flag written in the file"),
    "a password in an environment variable": (
        lambda c: c["setup_commands"].append("echo 'export MLFLOW_TRACKING_PASSWORD=hunter2' >> ~/.bashrc"),
        "a password or secret key setting written in the file"),
    "a password as a YAML value": (lambda c: c["provider"].update(db_password="hunter2"),
                                   "db_password is a password written in the file"),
    "an MLflow server anyone can use": (lambda c: _head_start(c, "--app-name basic-auth ", ""),
                                        "mlflow server without --app-name basic-auth lets anyone"),
    "workers without the MLflow login": (lambda c: c.pop("cluster_synced_files"),
                                         "cluster_synced_files has no ~/.mlflow/credentials"),
}


def _head_setup(config, old, new):
    config["head_setup_commands"] = [c.replace(old, new) for c in config["head_setup_commands"]]


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_injected_mistake_is_caught_in_one_line(tmp_path, mistake):
    inject, message = MISTAKES[mistake]
    config = copy.deepcopy(load())
    inject(config)
    result = check(tmp_path, config)
    assert result.returncode == 2, (mistake, result.stdout, result.stderr)
    assert message in result.stderr, (mistake, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "hunter2" not in result.stderr and ":mlflow@" not in result.stderr  # the error shows no password


def test_a_written_password_is_refused_naming_its_line(tmp_path):
    """The line of the file as the user wrote it (a command folded over several lines: the line
    that holds the password)."""
    with open(CLUSTER) as f:
        lines = f.read().splitlines()
    at = next(i for i, line in enumerate(lines) if "--backend-store-uri postgresql+psycopg://mlflow@" in line)
    lines[at] = lines[at].replace("mlflow@", "mlflow:hunter2@")
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = run_cli_here("platform.cluster_file", str(path), cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: {path}: line {at + 1}: a password in a URI written in the file; generate it at set-up "
        f"(openssl rand -hex 24 > ~/.mlflow/db_password, readable only by its user)"), result.stderr
    assert "hunter2" not in result.stderr


def test_a_missing_or_broken_file_is_one_line(tmp_path):
    result = run_cli("platform.cluster", str(tmp_path / "nope.yaml"), cwd=str(tmp_path))
    assert result.returncode == 2 and "No such file or directory" in result.stderr
    (tmp_path / "bad.yaml").write_text("cluster_name: [unclosed\n")
    result = run_cli("platform.cluster", str(tmp_path / "bad.yaml"), cwd=str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_the_kuberay_job_runs_the_same_sweep_with_spot_gpus_from_zero():
    with open(os.path.join(ROOT, "kubernetes", "rayjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("python -m platform.tune task=mae")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"} and spec["rayVersion"] == "2.60.0"
    assert "trial_driver" in spec["headGroupSpec"]["rayStartParams"]["resources"]
    (workers,) = spec["workerGroupSpecs"]
    assert workers["minReplicas"] == 0 and workers["template"]["spec"]["nodeSelector"] == {
        "eks.amazonaws.com/capacityType": "SPOT"}
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["DEEPLENSE_RESULTS"].startswith("s3://")
    # Every Ray container (so every trial) logs to MLflow with the login of a Secret made at set-up.
    for group in (spec["headGroupSpec"], workers):
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert env == {"MLFLOW_TRACKING_USERNAME": {"name": "mlflow-credentials", "key": "username"},
                       "MLFLOW_TRACKING_PASSWORD": {"name": "mlflow-credentials", "key": "password"}}


def test_the_kubernetes_mlflow_server_requires_a_login_and_writes_no_password():
    from platform.cluster_file import secret_problems

    for name in ("mlflow.yaml", "rayjob.yaml"):
        with open(os.path.join(ROOT, "kubernetes", name)) as f:
            assert secret_problems(f.read()) == [], name
    with open(os.path.join(ROOT, "kubernetes", "mlflow.yaml")) as f:
        config_map, deployment, service = yaml.safe_load_all(f)
    assert service["spec"]["type"] == "ClusterIP" and service["metadata"]["name"] == "mlflow"
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server["command"][:3] == ["mlflow", "server", "--app-name=basic-auth"]
    assert "password" not in config_map["data"]["basic_auth.ini"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in server["env"] if "valueFrom" in e}
    assert secrets == {"MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow-credentials", "MLFLOW_FLASK_SERVER_SECRET_KEY": "mlflow-server",
                       "PGPASSWORD": "mlflow-server"}
    # The host the RayJob's trials log to is one the server accepts.
    allowed = next(a for a in server["command"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow.deeplense.svc.cluster.local:5000" in allowed
