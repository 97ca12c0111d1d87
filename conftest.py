"""Root conftest: put the project's ``platform`` package in place for bare ``pytest``.

Bare ``pytest`` imports the standard-library ``platform`` before it reads this file (for
its header line), so the cached module would hide our package. Swap it out; libraries
that already hold the standard module keep working, and ours is a complete stand-in.
"""

import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if not hasattr(sys.modules.get("platform"), "__path__"):
    sys.modules.pop("platform", None)
    import platform  # noqa: F401,E402  (our package now)

# Every Ray the tests start (local, `ray start --head`, multi-node Cluster) stays on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Hermetic: each test names its own MLflow store, or relies on the default in its directory.
os.environ.pop("MLFLOW_TRACKING_URI", None)
for name in ("DEEPLENSE_CACHE", "DEEPLENSE_RESULTS", "RAY_ADDRESS"):  # a cluster's defaults (cluster.yaml)
    os.environ.pop(name, None)
# Ray workers must import our package from interpreter start.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p
)
