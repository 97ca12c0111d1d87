"""What every command shares: one-line errors for bad input, runs that never stay RUNNING."""

from __future__ import annotations

import contextlib
import gc
import signal
import sys

from platform import masking, tracking
from platform.config import ConfigError
from platform.data.shards import DataError
from platform.registry import UnknownTaskError

USER_ERRORS = (ConfigError, DataError, UnknownTaskError)


class CommandFailed(Exception):
    """The work ran and failed (every trial of a sweep failed): one line, exit status 1, no traceback."""


def run(main, argv: list[str]) -> int:
    """Run a command; bad input is one line on stderr and exit status 2, before any cluster work."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    # -v: every line the libraries log (platform.console)
    argv = [("log.level=debug" if a in ("-v", "--verbose") else a) for a in argv]
    from platform import provenance

    spec = main.__globals__.get("__spec__")
    module = (getattr(spec, "name", None) or main.__module__).removesuffix(".__main__")
    # Recorded on the command's runs: a password on the command line (a store URI's) is not.
    provenance.invoked[:] = [masking.redact(word) for word in provenance.command_line(list(argv), module)]
    # A SIGTERM (a cluster stopping the job, a spot node going away) unwinds like Ctrl-C,
    # so open MLflow runs are closed as KILLED rather than left RUNNING.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Every error line and traceback goes out with the passwords in it masked: an error may quote a
    # setting (mlflow.tracking_uri=postgresql://user:pw@...), a library's message the store's address.
    try:
        return main(argv)
    except USER_ERRORS as error:
        print(masking.redact(f"error: {error}"), file=sys.stderr)
        return 2
    except CommandFailed as error:
        print(masking.redact(f"error: {error}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: its whole traceback, as the interpreter would print it
        import traceback

        print(masking.redact(traceback.format_exc()), file=sys.stderr, end="", flush=True)
        return 1


def exit_with(main) -> None:
    """``python -m platform.<command>``: run it on this process's arguments and exit with its status."""
    status = run(main, sys.argv[1:])
    # The interpreter's last full garbage collection walks every object torch, Ray and MLflow
    # made, 3-4 s on two cores after the work is done; frozen objects are skipped (atexit
    # handlers, which flush MLflow and disconnect from Ray, still run).
    gc.freeze()
    sys.exit(status)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def ends_run(client, run_id: str):
    """FINISHED on success, KILLED on interrupt, FAILED on any error: never left RUNNING.

    A run something else already ended keeps that verdict: a trial that Tune stops unwinds
    here late, after the sweep has recorded how it really ended.
    """
    try:
        yield
    except KeyboardInterrupt:
        tracking.end_run(client, run_id, "KILLED", only_if_running=True)
        raise
    except BaseException:
        tracking.end_run(client, run_id, "FAILED", only_if_running=True)
        raise
    tracking.end_run(client, run_id, "FINISHED", only_if_running=True)


def ui_hint(uri: str, experiment: str, run_id: str) -> str:
    """How to see ``run_id`` in the MLflow UI: the server to start for a local store, and the page."""
    from platform import tracking

    base = tracking.ui_base(uri)
    if base is None:  # a hosted store (databricks://...): its own UI
        return f"MLflow UI:  {masking.redact(uri)}"
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI:  {tracking.ui_link(base, experiment, run_id)}"
    return (f"MLflow UI:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1   then open "
            f"{tracking.ui_link(base, experiment, run_id)}")


def usage() -> str:
    from platform import registry

    return (
        "usage: python -m platform.{train,tune,data,insight} task=NAME [section.key=value ...]\n"
        "       python -m platform.report [mlflow.tracking_uri=...] [report.out=report]\n"
        "       python -m platform.evaluate model=RUN_ID|models:/NAME/VERSION|CHECKPOINT [data.path=...|data.preset=...]\n"
        "       python -m platform.predict model=... data.path=FOLDER evaluate.out=predictions.csv\n"
        f"tasks: {', '.join(registry.names())}\n"
        "examples: task=mae train.epochs=5 scaling.num_workers=4 scaling.use_gpu=true tune.num_samples=50\n"
        "-v (log.level=debug): also every line Ray, MLflow and Optuna log\n"
        "see README.md for every key"
    )
