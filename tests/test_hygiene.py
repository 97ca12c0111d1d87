"""Security hygiene: secrets never reach MLflow or the console, and nothing is unpickled on load."""

import os
import re
from dataclasses import dataclass, field

from platform import tracking
from platform.config import to_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Store:
    tracking_uri: str = "postgresql://mlflow:hunter2@db.internal:5432/mlflow"
    api_token: str = "tok-123"
    password: str = "hunter2"
    aws_secret_access_key: str = "AKIA/very/secret"
    key: str = "k-1"
    keep: str = "s3://bucket/path"


@dataclass
class Config:
    store: Store = field(default_factory=Store)
    epochs: int = 3


def test_secret_looking_keys_are_never_params_and_uri_passwords_are_masked():
    flat = {"store.tracking_uri": Store.tracking_uri, "store.api_token": "tok-123", "store.password": "hunter2",
            "store.aws_secret_access_key": "AKIA", "store.key": "k-1", "store.keep": "s3://bucket/path",
            "train.epochs": 3, "model.monkey": "not a key"}
    params = tracking.public_params(flat)
    assert set(params) == {"store.tracking_uri", "store.keep", "train.epochs", "model.monkey"}
    assert params["store.tracking_uri"] == "postgresql://mlflow:***@db.internal:5432/mlflow"


def test_the_logged_and_printed_config_masks_secrets():
    text = to_yaml(Config())
    for secret in ("hunter2", "tok-123", "AKIA", "k-1"):
        assert secret not in text
    assert "s3://bucket/path" in text and "epochs: 3" in text and text.count("'***'") + text.count("***") >= 4


def calls(source: str, name: str) -> list[str]:
    """The full text of every ``name(...)`` call in source, nested parentheses included."""
    found = []
    for match in re.finditer(re.escape(name) + r"\(", source):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        found.append(source[match.start():end + 1])
    return found


def test_nothing_is_unpickled_when_loading_checkpoints_or_data():
    torch_loads, numpy_loads = [], []
    for folder in ("platform", "tasks"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if name.endswith(".py"):
                    source = open(os.path.join(dirpath, name)).read()
                    torch_loads += [(name, call) for call in calls(source, "torch.load")]
                    numpy_loads += [(name, call) for call in calls(source, "np.load")]
    assert torch_loads and numpy_loads  # the scan found the loaders
    assert all("weights_only=True" in call for _, call in torch_loads), torch_loads
    assert all("allow_pickle=False" in call for _, call in numpy_loads), numpy_loads
