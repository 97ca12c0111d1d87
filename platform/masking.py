"""Secrets never shown or logged: config values whose key names a secret, and passwords in URIs.

One place for the rule, used by the config's YAML (console, ``config.yaml`` artifact), the MLflow
params (``tracking.public_params``) and every printed store address.
"""

from __future__ import annotations

import re
from typing import Any

# A key whose last part names a secret (db_password, api_token, aws_secret, access_key, key).
_SECRET = re.compile(r"pass(word|wd)?|token|secret|credential|(^|_)key(s)?($|_)|apikey", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@", re.I)
REDACTED = "***"


def is_secret(key: str) -> bool:
    return bool(_SECRET.search(key.rsplit(".", 1)[-1]))


def redact(value: Any) -> Any:
    """A value as it may be shown or logged: a URI's password (postgresql://user:pw@host) masked."""
    return _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value) if isinstance(value, str) else value


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
