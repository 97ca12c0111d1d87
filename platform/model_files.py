"""The kept model's files, which never run code when read: the weights as safetensors beside the
run's config (YAML), rebuilt by the platform's registered task.

A logged model is an MLflow pyfunc model whose loader is this module (``loader_module``): its folder
holds ``MLmodel``, the environment files, the input example as JSON and ``data/model/`` with
``weights.safetensors`` and ``config.yaml``; no cloudpickled class, no copied code, no pickle. So
``mlflow.pyfunc.load_model("models:/<task>/<version>")`` works wherever the project is importable,
and a model from a shared registry can carry nothing but numbers and settings.

Every loader of the platform reads weights with ``read_weights`` (``init_from=`` too), and every whole
model (``platform.evaluate``/``predict``, a run's kept model, the pyfunc loader) is rebuilt by ``build``.
"""

from __future__ import annotations

import os

from platform import config as config_lib
from platform import registry
from platform.config import ConfigError
from platform.masking import REDACTED

LOADER = __name__  # the MLmodel's loader_module: importable wherever the platform is
DATA = "model"  # the folder of ``data_path``: the model's files sit at data/model/ in its MLflow folder
WEIGHTS, CONFIG = "weights.safetensors", "config.yaml"
PICKLED = ("holds pickled objects (a whole pickled model?), which are never unpickled here: they could run any "
           "code; expected a state dict (a run's checkpoints/best_model.pt) or a .safetensors file")


def save(model, cfg, folder: str) -> str:
    """``model``'s weights and ``cfg`` in ``folder``/model (created): the data of a logged model. Returns it."""
    from safetensors.torch import save_file

    path = os.path.join(folder, DATA)
    os.makedirs(path, exist_ok=True)
    # Copies: safetensors refuses tensors that share memory (tied weights); load_state_dict ties them again.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS), metadata={"task": cfg.task})
    with open(os.path.join(path, CONFIG), "w") as f:
        f.write(config_lib.to_yaml(cfg))
    return path


def read_weights(path: str, what: str) -> dict:
    """A CPU state dict from a weights file, never running code: a ``.safetensors`` file, or any other
    with ``torch.load(weights_only=True)`` (a loop ``state.pt`` gives its model part). A file of
    pickled objects (a whole pickled model) is a one-line error naming ``what``."""
    import pickle

    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses anything but tensors and plain containers
        raise ConfigError(f"{what}: {os.path.basename(path)} {PICKLED}") from None
    if isinstance(state, dict) and "model" in state and "optimizer" in state:
        state = state["model"]  # a full loop checkpoint
    return state


def build(task, cfg, state: dict, what: str):
    """The task's model with ``state``'s weights, every tensor matched, or a one-line error naming ``what``."""
    model = task.build_model(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise ConfigError(f"{what} does not fit task {cfg.task} with these settings: {len(missing)} tensor(s) "
                          f"missing or of another shape, {len(unexpected)} unexpected (e.g. {first}); give the "
                          f"model settings it was trained with")
    model.load_state_dict(state)
    return model


def config_of(path: str):
    """The config a model folder (``save``'s ``path``) was logged with, rebuilt for this version of the platform."""
    with open(os.path.join(path, CONFIG)) as f:
        recorded = config_lib.flatten(config_lib.load_yaml(f.read()))
    task_name = recorded.pop("task")
    schema = config_lib.schema_for(registry.get(task_name))
    known = {k: v for k, v in recorded.items() if config_lib.is_value_key(schema, k)}  # this version's settings
    return config_lib.build(task_name, [model_settings(known)])


def model_settings(recorded: dict) -> dict:
    """A run's recorded settings less those with no say in a model whose weights are all there: where
    its weights once started from (``init_from``), a local weights file (``pretrained_path``), masked secrets."""
    return {k: v for k, v in recorded.items()
            if k != "init_from" and not k.endswith("pretrained_path") and v != REDACTED}


def load(path: str):
    """The model a folder ``save`` wrote holds, on the CPU, in eval mode."""
    cfg = config_of(path)
    what = f"the model in {path}"
    return build(registry.task_of(cfg), cfg, read_weights(os.path.join(path, WEIGHTS), what), what).eval()


class PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` returns the predictions of: the model run on a batch, as
    MLflow's PyTorch flavor runs it (a float32 array or DataFrame in, one tensor out as an array)."""

    def __init__(self, model, device: str = "cpu"):
        self.model, self.device = model.to(device), device

    def get_raw_model(self):
        return self.model

    def predict(self, data, params: dict | None = None):
        import numpy as np
        import pandas as pd
        import torch

        batch = data.to_numpy(dtype=np.float32) if isinstance(data, pd.DataFrame) else np.asarray(data)
        with torch.no_grad():
            output = self.model(torch.from_numpy(batch).to(self.device), **(params or {}))
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"this model returns a {type(output).__name__}, not one tensor: take the torch model "
                            f"with get_raw_model(), or score it with python -m platform.evaluate model=<its models:/ URI>")
        output = output.cpu().numpy()
        return pd.DataFrame(output, index=data.index) if isinstance(data, pd.DataFrame) else output


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> PyfuncModel:
    """MLflow's entry point (``loader_module``): ``data_path`` is the model's data/model folder."""
    return PyfuncModel(load(data_path), (model_config or {}).get("device", "cpu"))
