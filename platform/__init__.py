"""DeepLense Platform, and a complete stand-in for the standard-library ``platform`` module.

The user's command is ``python -m platform.tune``, so this package shadows the standard
module that ray, torch, mlflow, optuna and ``uuid`` import. We execute the standard
library's own ``platform.py`` source into this namespace, so ``platform.system()``,
``platform.uname()`` (and pickling its result, which looks the class up as
``platform.uname_result``) behave exactly as they do without us. Loading a copy under
another module name would break that pickling, hence ``exec`` here.

No submodule of this package may take a name the standard module defines (``system``,
``version``, ``machine``, ``node``, ``uname``, ...): importing it would replace that
function for every library in the process.
"""

import os as _os
import sysconfig as _sysconfig

_STDLIB_PLATFORM = _os.path.join(_sysconfig.get_paths()["stdlib"], "platform.py")
with open(_STDLIB_PLATFORM, encoding="utf-8") as _source:
    exec(compile(_source.read(), _STDLIB_PLATFORM, "exec"), globals())
del _source

# The project root: Ray workers need it on PYTHONPATH from interpreter start, because
# they import ray (and so ``platform``) before any driver directory reaches sys.path.
PROJECT_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
