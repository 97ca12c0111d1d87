"""Secrets never shown or logged: config values whose key names a secret, and passwords in URIs.

One place for the rule, used by the config's YAML (console, ``config.yaml`` artifact), the MLflow
params (``tracking.public_params``), every printed store address, and every error line and traceback
a command prints (``cli.run``).
"""

from __future__ import annotations

import re
from typing import Any

# A key whose last part names a secret (db_password, api_token, aws_secret, access_key, key).
_SECRET = re.compile(r"pass(word|wd)?|token|secret|credential|(^|_)key(s)?($|_)|apikey", re.IGNORECASE)
# scheme://user:password@host. The password runs to the last '@' before a space, a quote or the next
# URI, so one with a raw '@' or '/' in it (p@ss/word, as people paste them) is masked whole.
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s'\"]*):(?P<password>(?:(?!://)[^\s'\"])+)@",
                           re.I)
# key=value in an error line or a query string (?password=x, PGPASSWORD=x): masked when the key names a
# password, token or secret (not a bare `key`, which text uses for other things: "expected key=value").
_KEY_VALUE = re.compile(r"(?P<key>[A-Za-z_][\w.-]*)=(?P<value>[^\s&;,'\"]+)")
_SECRET_IN_TEXT = re.compile(r"pass(word|wd)?|pwd|token|secret|credential|api_?key|access_?key|private_?key", re.I)
REDACTED = "***"


def is_secret(key: str) -> bool:
    return bool(_SECRET.search(key.rsplit(".", 1)[-1]))


def redact(value: Any) -> Any:
    """A value or a whole text as it may be shown or logged: a URI's password (postgresql://user:pw@host)
    and the value of a secret-named ``key=value`` (password=pw) masked."""
    if not isinstance(value, str):
        return value
    value = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    return _KEY_VALUE.sub(lambda m: f"{m['key']}={REDACTED}" if _SECRET_IN_TEXT.search(m["key"].rsplit(".", 1)[-1])
                          else m[0], value)


def redacted(tree: Any, key: str = "") -> Any:
    """A (nested) config dict with secret-looking keys' values and URI passwords masked: for
    params, the config.yaml artifact and the console."""
    if isinstance(tree, dict):
        return {k: redacted(v, k) for k, v in tree.items()}
    if key and is_secret(key) and tree not in ("", None):
        return REDACTED
    if isinstance(tree, list):
        return [redacted(v) for v in tree]
    return redact(tree)
