"""Secrets and the cluster: no command prints a password, a store that cannot be reached is one line at
once, and the MLflow server cluster.yaml runs requires the login its set-up generates."""

import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from contextlib import redirect_stderr

import pytest
import yaml

from platform import cli, masking, provenance, tracking
from platform.config import ConfigError
from tests.helpers import ROOT, free_port, run_cli, run_cli_here

PASSWORD = "hunter2"
SECRET_URI = f"postgresql://user:{PASSWORD}@127.0.0.1:1/db"  # nothing listens on port 1
MASKED_URI = "postgresql://user:***@127.0.0.1:1/db"
RUN_ID = "0123456789abcdef0123456789abcdef"

# Each command with what it needs to reach its store. platform.data has no store: its setting echoed
# back in an error carries the password instead.
COMMANDS = {
    "platform.train": ["task=classification"],
    "platform.tune": ["task=classification"],
    "platform.evaluate": [f"model={RUN_ID}"],
    "platform.predict": [f"model={RUN_ID}", "data.path=.", "evaluate.out=predictions.csv"],
    "platform.insight": ["task=classification", "tune.name=sweep"],
    "platform.report": [],
    "platform.data": ["task=classification", f"data.preset={SECRET_URI}"],
}


def test_passwords_are_masked_in_uris_settings_and_whole_texts():
    assert masking.redact("error: mlflow.tracking_uri=postgresql://u:pw@db:5432/x is not") == \
        "error: mlflow.tracking_uri=postgresql://u:***@db:5432/x is not"
    # A raw '@' or '/' in a pasted password, two URIs on a line, a query string, a variable.
    assert masking.redact("postgresql://u:p@ss/w0rd@db/x and http://a:b@c:5000") == \
        "postgresql://u:***@db/x and http://a:***@c:5000"
    assert masking.redact("s3://bucket/x?password=hunter2&region=eu PGPASSWORD=hunter2 train.lr=0.1") == \
        "s3://bucket/x?password=***&region=eu PGPASSWORD=*** train.lr=0.1"
    for kept in ("http://127.0.0.1:5000/#/experiments/1", "sqlite:////tmp/mlflow.db", "postgresql://mlflow@db/x",
                 "expected key=value arguments", "sorted(runs, key=lambda r: r.start_time)"):
        assert masking.redact(kept) == kept


def test_every_line_a_command_prints_for_an_error_is_masked(request):
    def bad_input(argv):
        raise ConfigError(f"mlflow.tracking_uri={SECRET_URI}: no such store")

    def bug(argv):  # a library's exception quoting the store, deep in a traceback
        raise RuntimeError(f"cannot connect to {SECRET_URI}")

    sigterm, invoked = signal.getsignal(signal.SIGTERM), list(provenance.invoked)  # cli.run sets both
    request.addfinalizer(lambda: (signal.signal(signal.SIGTERM, sigterm), provenance.invoked.__setitem__(
        slice(None), invoked)))
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.run(bad_input, [f"mlflow.tracking_uri={SECRET_URI}"]) == 2
    assert err.getvalue() == f"error: mlflow.tracking_uri={MASKED_URI}: no such store\n"
    # The command line recorded on the command's runs (platform.command) is masked too.
    assert provenance.invoked[-1] == f"mlflow.tracking_uri={MASKED_URI}"
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.run(bug, []) == 1
    assert err.getvalue().startswith("Traceback (most recent call last):")
    assert f"RuntimeError: cannot connect to {MASKED_URI}" in err.getvalue() and PASSWORD not in err.getvalue()


def test_a_tracking_server_that_does_not_answer_is_one_masked_line(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{PASSWORD}@127.0.0.1:{port}")
    with pytest.raises(ConfigError) as error:
        tracking.tracking_uri("")
    assert str(error.value).startswith(f"MLFLOW_TRACKING_URI=http://admin:***@127.0.0.1:{port}: nothing answers at "
                                       f"127.0.0.1:{port}")
    assert PASSWORD not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["argument", "environment"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_store_password_never_reaches_the_terminal(tmp_path, command, via):
    """Each command as a user runs it, its store a PostgreSQL URI with a password that answers nowhere:
    one masked line at once (whatever MLflow or the driver would raise), before any Ray or data work."""
    args = [*COMMANDS[command], f"data.cache_dir={tmp_path / 'cache'}"] if command != "platform.report" else []
    env = {"RAY_ADDRESS": ""}
    if via == "argument":
        args.append(f"mlflow.tracking_uri={SECRET_URI}")
    else:
        env["MLFLOW_TRACKING_URI"] = SECRET_URI
    # As a real process once (what reaches the terminal, library logging included); the same
    # refusal through the environment in this process (a new interpreter costs seconds).
    # timeout: a hang guard (MLflow would retry a database for most of an hour), not a speed test.
    result = (run_cli(command, *args, cwd=str(tmp_path), env=env, timeout=120) if via == "argument"
              else run_cli_here(command, *args, cwd=str(tmp_path), env=env))
    printed = result.stdout + result.stderr
    assert PASSWORD not in printed, printed
    assert result.returncode == 2 and result.stderr.startswith("error: ") and \
        len(result.stderr.strip().splitlines()) == 1, printed
    setting = "data.preset" if command == "platform.data" else \
        "mlflow.tracking_uri" if via == "argument" else "MLFLOW_TRACKING_URI"
    assert f"{setting}={MASKED_URI}" in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ray_results").exists()


def _head_secrets_command() -> str:
    """The head_setup_commands step of cluster.yaml that generates the passwords."""
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        commands = yaml.safe_load(f)["head_setup_commands"]
    (command,) = [c for c in commands if "openssl rand" in c]
    return command


def _ini(path) -> dict:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(path)
    return dict(parser["mlflow"])


@pytest.mark.slow
def test_the_cluster_heads_generated_login_is_required_and_read_by_mlflows_client(tmp_path):
    """cluster.yaml's set-up step, run in a stand-in home: passwords generated once, readable only by
    their user; MLflow's basic-auth server with the generated config refuses a command without the
    login and serves one whose MLflow client reads ~/.mlflow/credentials, the file cluster_synced_files
    copies to the workers (their trials read it the same way)."""
    home, secrets = tmp_path / "head", tmp_path / "head" / ".mlflow"
    home.mkdir()
    set_up = ["bash", "-c", _head_secrets_command()]
    subprocess.run(set_up, env={**os.environ, "HOME": str(home)}, check=True)
    first = (secrets / "admin_password").read_text()
    subprocess.run(set_up, env={**os.environ, "HOME": str(home)}, check=True)  # a second `ray up` keeps them
    assert (secrets / "admin_password").read_text() == first and len(first.strip()) == 48
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for path in [*secrets.iterdir(), home / ".pgpass"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    password = first.strip()
    assert _ini(secrets / "credentials") == {"mlflow_tracking_username": "admin", "mlflow_tracking_password": password}
    auth = _ini(secrets / "basic_auth.ini")
    assert auth["admin_password"] == password and auth["database_uri"].startswith("postgresql+psycopg://mlflow@")
    assert (home / ".pgpass").read_text().strip().endswith(":mlflow:" + (secrets / "db_password").read_text().strip())

    # No PostgreSQL here: the server's users in sqlite, the rest as the head runs it.
    config = tmp_path / "basic_auth.ini"
    config.write_text((secrets / "basic_auth.ini").read_text().replace(
        auth["database_uri"], f"sqlite:///{tmp_path / 'users.db'}"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen(
        [mlflow, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'runs.db'}", "--artifacts-destination", str(tmp_path / "art")],
        env={**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
             "MLFLOW_FLASK_SERVER_SECRET_KEY": (secrets / "flask_secret_key").read_text().strip()},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not come up"
                time.sleep(1)
        nobody = tmp_path / "laptop"
        nobody.mkdir()
        report = ["report.out=report"]
        refused = run_cli("platform.report", f"mlflow.tracking_uri={url}", *report, cwd=str(tmp_path),
                          env={"HOME": str(nobody)})
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            f"error: mlflow.tracking_uri={url}: the tracking server refuses these credentials (HTTP 401); set "
            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to a user of that "
            f"server"], refused.stderr
        wrong = run_cli("platform.report", f"mlflow.tracking_uri=http://admin:wrong-hunter2@127.0.0.1:{port}", *report,
                        cwd=str(tmp_path), env={"HOME": str(nobody)})
        assert wrong.returncode == 2 and "admin:***@" in wrong.stderr and "wrong-hunter2" not in wrong.stdout + wrong.stderr
        served = run_cli("platform.report", f"mlflow.tracking_uri={url}", *report, cwd=str(tmp_path),
                         env={"HOME": str(home)})
        assert served.returncode == 0, served.stderr
        assert re.search(r"report\.md: 0 rows", served.stdout) and password not in served.stdout + served.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(home / ".mlflow", ignore_errors=True)


def test_a_failed_trials_reason_is_masked():
    """The one line a failed trial leaves on the console and on its run (platform.failure)."""
    from platform.tune import failure_reason

    error = RuntimeError(f"Traceback ...\nMlflowException: API request to {SECRET_URI} failed")
    assert failure_reason(error) == f"MlflowException: API request to {MASKED_URI} failed"
