"""What a test session shares, so that the end-to-end tests pay for Ray once, not once per command.

``ray_head``: one Ray head for the whole run (both pytest-xdist workers), started with ``ray start
--head`` on loopback, as a user starts one on a workstation or a cluster's head node. Every test marked ``slow`` runs its commands against it
(``RAY_ADDRESS``), which saves each command a local Ray's start and shutdown (about 12 s on two
cores). A test about the local Ray a command starts for itself (the laptop path) is marked
``own_ray``; tests about several nodes build their own ``ray.cluster_utils.Cluster``.

The head is a plain ``ray start --head`` without the ``trial_driver`` resource of ``cluster.yaml``'s
head: sweeps on it place their trial functions by a memory-only bundle, while the local Rays and the
multi-node tests advertise ``trial_driver``; both placements stay tested.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import free_ports

RAY = os.path.join(os.path.dirname(sys.executable), "ray")

# pytest-xdist runs two test processes on CI's two cores: one torch thread each, or OpenMP's
# spinning threads fight over the cores (the fast tests take longer on two workers than on one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ray 2.60 authenticates every request with a token. One per session, shared by every Ray the
# tests start and every command they run (a head and its clients must agree on it).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# The platform never runs MLflow's server-side jobs; without this every `mlflow server` a test
# starts keeps job-runner processes polling for them (a minute of CPU over the suite).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


HEAD_DIR = "DEEPLENSE_TEST_RAY_HEAD_DIR"  # where the session's head keeps its files, set by the controller


def pytest_configure(config):
    """The controlling process (pytest itself, or pytest-xdist's controller) names the folder of the
    session's one Ray head; its workers inherit the name, and the first test that needs the head
    starts it there. One head for both xdist workers, not one each: an idle head costs about 7% of a
    core (its dashboard, agents and log monitor), 100 core-seconds over the suite."""
    if not hasattr(config, "workerinput"):
        os.environ[HEAD_DIR] = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths stay under 108 bytes


def pytest_unconfigure(config):
    """The controller ends the head once every worker is done with it."""
    folder = os.environ.get(HEAD_DIR)
    if hasattr(config, "workerinput") or not folder:
        return
    try:
        with open(os.path.join(folder, "head.json")) as f:
            pid = json.load(f)["pid"]
    except (OSError, ValueError):
        pid = None  # no test needed the head
    if pid:
        # --block kept every process of the head in its one process group: they all end, without
        # `ray stop`, which would stop every Ray on the machine (the multi-node tests' too).
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + grace
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)
    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reaped if it is our child (pytest without xdist)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="session")
def ray_head():
    """{"address": host:port, "dashboard": http://...} of the Ray head that lives for the session,
    started by the first test (of any xdist worker) that asks for it."""
    folder = os.environ[HEAD_DIR]
    with open(os.path.join(folder, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits while one starts it
        record = os.path.join(folder, "head.json")
        if not os.path.exists(record):
            head = _start_head(folder)
            with open(record + ".new", "w") as f:
                json.dump(head, f)
            os.replace(record + ".new", record)
        with open(record) as f:
            head = json.load(f)
    return {"address": head["address"], "dashboard": head["dashboard"]}


def _start_head(folder: str) -> dict:
    # Ports of their own for the head's servers with fixed defaults (the dashboard agent's 52365, the
    # Ray client's 10001): another Ray on this machine (a multi-node test's) must not collide with
    # it. Ray picks the other servers' ports itself.
    port, dashboard, client_server, agent = free_ports(4)
    own_ports = [f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent}"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # An activated virtualenv, as the user's shell has it: a submitted job's `python` is this one.
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    log = os.path.join(folder, "head.log")
    # Two CPUs for each xdist worker's trials, as when each had a head of its own. --block keeps
    # every process of the head in one process group (see pytest_unconfigure).
    with open(log, "w") as out:
        head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                                 f"--temp-dir={folder}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                 "--disable-usage-stats", *own_ports], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while (not os.path.exists(os.path.join(folder, "ray_current_cluster")) or not _answers(dashboard)
           or not _job_agent_registered(address)):
        if head.poll() is not None or time.time() > deadline:
            os.killpg(head.pid, signal.SIGKILL) if head.poll() is None else None
            raise RuntimeError(f"the session's Ray head did not start:\n{open(log).read()[-3000:]}")
        time.sleep(0.5)
    return {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "pid": head.pid}


def _job_agent_registered(address: str) -> bool:
    """The head's dashboard agent has told the GCS where it listens: until then ``ray job submit``
    is refused ("No available agent to submit job"), which on a busy machine is seconds after the
    dashboard answers."""
    from ray._raylet import GcsClient

    try:
        return bool(GcsClient(address=address).internal_kv_keys(
            b"DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX:", namespace=b"dashboard", timeout=2))
    except Exception:  # the GCS is not up yet
        return False


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _slow_tests_share_the_ray_head(request, monkeypatch):
    """Commands of a ``slow`` test find the session's head through RAY_ADDRESS, as a user's shell on a
    head node would; ``own_ray`` tests start a local Ray of their own, as on a laptop."""
    if request.node.get_closest_marker("slow") is None or request.node.get_closest_marker("own_ray") is not None:
        return
    monkeypatch.setenv("RAY_ADDRESS", request.getfixturevalue("ray_head")["address"])
