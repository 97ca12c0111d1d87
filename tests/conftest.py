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
import sys
import tempfile

import pytest

from benchmarks.common import start_head, stop_head

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
        stop_head({"pid": pid})
    shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The heaviest test files first, so the two xdist workers end together.

    pytest-xdist (``--dist loadfile --no-loadscope-reorder``) hands out one test file at a time to
    whichever worker is free, in this order; a file stays on one worker, so its module fixtures are
    built once (the two sweeps of test_researcher_view.py, the two-node cluster of test_multinode.py).
    Longest-first is the classic rule for that kind of schedule: a long file handed out last leaves
    the other worker idle for its length. The weights are rough on purpose: a ``heavy`` test takes a
    minute or more on two cores, a ``slow`` one 10-60 s, the rest well under a second.
    """
    def weight(item) -> int:
        return 100 if item.get_closest_marker("heavy") else 25 if item.get_closest_marker("slow") else 1

    def file(item) -> str:
        return item.nodeid.split("::")[0]

    totals: dict[str, int] = {}
    for item in items:
        totals[file(item)] = totals.get(file(item), 0) + weight(item)
    items.sort(key=lambda item: -totals[file(item)])  # stable: a file's tests keep their order


def pytest_runtest_logreport(report):
    """A failure is named the moment it happens, not only in the summary at the end: when CI stops a
    run at its time limit, the summary is never printed, and the dots alone name no test."""
    if not report.failed or _is_xdist_worker():
        return
    crash = getattr(report.longrepr, "reprcrash", None)  # (path, line, message) where it raised
    lines = (crash.message if crash else str(report.longrepr)).strip().splitlines() or [""]
    sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when}, {report.duration:.0f} s): {lines[0][:300]}\n")
    sys.stderr.flush()


def _is_xdist_worker() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


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
    env = {**os.environ,
           # An activated virtualenv, as the user's shell has it: a submitted job's `python` is this one.
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    # Two CPUs for each xdist worker's trials, as when each had a head of its own.
    return start_head(folder, env, num_cpus=4, log=os.path.join(folder, "head.log"), takes_jobs=True)


@pytest.fixture(autouse=True)
def _slow_tests_share_the_ray_head(request, monkeypatch):
    """Commands of a ``slow`` test find the session's head through RAY_ADDRESS, as a user's shell on a
    head node would; ``own_ray`` tests start a local Ray of their own, as on a laptop."""
    if request.node.get_closest_marker("own_ray") is not None:
        yield from _a_laptop_of_its_own(monkeypatch)
        return
    if request.node.get_closest_marker("slow") is not None:
        monkeypatch.setenv("RAY_ADDRESS", request.getfixturevalue("ray_head")["address"])
    yield


def _a_laptop_of_its_own(monkeypatch):
    """A command with no address joins "a running local Ray" (the latest in Ray's temp folder's
    ``ray_current_cluster``), as ``ray.init()`` does. On a laptop that is the user's own; here the other
    xdist worker's multi-node ``Cluster`` writes that file, and a laptop-path sweep joined a cluster
    that test was tearing down ("Owner's node has crashed"). A temp folder of its own keeps each
    ``own_ray`` test on the local Ray its command starts."""
    folder = tempfile.mkdtemp(prefix="or", dir="/tmp")  # Ray's socket paths stay under 108 bytes
    monkeypatch.setenv("RAY_TMPDIR", folder)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    shutil.rmtree(folder, ignore_errors=True)
