"""What the benchmarks share: the machine's description, medians, a table, the JSON file,
and running the platform's own CLIs as a user does (loopback Ray, the project on PYTHONPATH)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}").replace("  ", " ")


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def environment(**extra: str) -> dict:
    """A user's shell: the project on PYTHONPATH, and every Ray started here on loopback.

    Each command starts its own local Ray, as on a laptop, unless $DEEPLENSE_BENCH_RAY_ADDRESS names a
    running head: the test suite's smoke runs, which check the code paths, not the figures.
    """
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DEEPLENSE_RESULTS"):
        env.pop(name, None)
    if os.environ.get("DEEPLENSE_BENCH_RAY_ADDRESS"):
        env["RAY_ADDRESS"] = os.environ["DEEPLENSE_BENCH_RAY_ADDRESS"]
    return {**env, **_token_auth(), **extra}


@functools.cache
def _token_auth() -> dict:
    """Ray's token authentication, the same for a head ``start_head`` starts and the commands sent to
    it. Left to Ray 2.60, a head turns it on when ~/.ray/auth_token exists (any local ``ray.init`` writes
    one) while a client given an address does not, and is refused. One token for this run where the
    shell has none."""
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    have_token = os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(
        os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token"))
    return {"RAY_AUTH_MODE": "token", **({} if have_token else {"RAY_AUTH_TOKEN": secrets.token_hex(32)})}


def run(args: list[str], cwd: str, **env: str) -> tuple[float, str]:
    """(wall seconds, stdout) of one command; a failure stops the benchmark with the command's own output."""
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=environment(**env), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"benchmark command failed ({done.returncode}): {' '.join(args)}")
    return wall, done.stdout


def free_ports(count: int) -> list[int]:
    """``count`` different ports on 127.0.0.1 that nothing listens on now. All are held open until
    all are chosen: a port probed and closed is often the very one the kernel hands out next, and
    Ray refuses to start when two of its servers are given the same one."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def start_head(folder: str, env: dict, num_cpus: int | None = None, log: str = os.devnull,
               takes_jobs: bool = False, cwd: str | None = None, extra_args: tuple = (), port: int | None = None) -> dict:
    """``ray start --head --block`` on loopback with its files in ``folder`` (under /tmp: Ray's socket
    paths must stay under 108 bytes), as a user starts one on a workstation or a cluster's head node.
    Returns {"address": "127.0.0.1:port", "dashboard": "http://127.0.0.1:port", "pid"} once clients
    can connect, and with ``takes_jobs`` once ``ray job submit`` is accepted. ``cwd``: the folder it is
    started in, where jobs submitted without a working dir run. ``extra_args``: more ``ray start`` flags
    (``--resources``, ``--autoscaling-config``); ``port``: the GCS port, when something must know it first.

    The servers with fixed default ports (the dashboard agent's 52365, the Ray client's 10001) get
    ports of their own, so another Ray on this machine does not collide with it; Ray picks the
    other servers' ports itself. --block keeps every process of the head in one process group of its
    own, which ``stop_head`` ends as one, without ``ray stop`` (that stops every Ray on the machine).
    """
    ports = free_ports(5)
    port = port or ports.pop()  # given: a config written before the head starts names it
    dashboard, client_server, agent = [p for p in ports if p != port][:3]
    env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    with open(log, "w") as out:
        head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", f"--temp-dir={folder}",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                                 f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent}",
                                 *([f"--num-cpus={num_cpus}"] if num_cpus is not None else []), *extra_args],
                                env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 300  # room for a slow first start (a cold page cache, a busy machine)
    while (not os.path.exists(os.path.join(folder, "ray_current_cluster")) or not _listens(dashboard)
           or (takes_jobs and not _job_agent_registered(address))):
        if head.poll() is not None or time.time() > deadline:
            stop_head({"pid": head.pid})
            with open(log) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"ray start --head (in {folder}) did not come up:\n{tail}")
        time.sleep(0.5)
    return {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "pid": head.pid}


def stop_head(head: dict, grace: float = 5) -> None:
    """Ends every process of a ``start_head`` head: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30)):
        try:
            os.killpg(head["pid"], sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and _alive(head["pid"]):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped if it is this process's child
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


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


def table(header: list[str], rows: list[list]) -> str:
    cells = [["-" if c is None else f"{c:.3g}" if isinstance(c, float) and abs(c) < 100
              else f"{c:.0f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **result}, f, indent=2)
    print(f"\nwrote {path}")
