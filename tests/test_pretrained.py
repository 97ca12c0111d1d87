"""init_from: a run id, a registered model or a checkpoint file, resolved against a real MLflow store."""

import pytest
import torch
from safetensors.torch import save_file

from platform import config, pretrained, registry, tracking
from platform.config import ConfigError


@pytest.fixture
def store(tmp_path):
    """A sqlite MLflow store holding one MAE run with its best weights, registered as `mae` version 1."""
    client = tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking.experiment_id(client, "deeplense-mae")
    cfg = config.build("mae", [{"model.depth": 1, "model.embed_dim": 32, "model.num_heads": 2}])
    model = registry.get("mae").build_model(cfg)
    torch.save(model.state_dict(), tmp_path / "best_model.pt")
    run = tracking.start_run(client, experiment, "pretrain", {})
    tracking.log_file(client, run, str(tmp_path / "best_model.pt"), "checkpoints")
    tracking.log_model(client, run, model, cfg, torch.zeros(2, 1, 64, 64).numpy(), "mae")
    bare = tracking.start_run(client, experiment, "no-weights", {})
    return client, run, bare, model, tmp_path


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_id_registered_model_and_file_give_the_same_weights(store):
    client, run, _, model, tmp_path = store
    expected = model.state_dict()
    for init_from in (run, "models:/mae/1", "models:/mae/latest"):
        source = pretrained.resolve(init_from, client)
        assert source.run_id == run and source.tags() == {"platform.init_from": init_from, "platform.init_run_id": run}
        # A registered version's own safetensors; a run's checkpoints/best_model.pt.
        assert (source.weights or "").endswith("data/model/weights.safetensors") == init_from.startswith("models:/")
        assert same_weights(pretrained.load_state(source, client), expected)
    source = pretrained.resolve(str(tmp_path / "best_model.pt"), client)
    assert source.run_id is None and same_weights(pretrained.load_state(source), expected)
    # A loop checkpoint (model, optimizer, ...) gives its model part; a safetensors file its tensors.
    torch.save({"model": expected, "optimizer": {}, "epoch": 3}, tmp_path / "state.pt")
    assert same_weights(pretrained.load_state(pretrained.resolve(str(tmp_path / "state.pt"), client)), expected)
    save_file({k: v.clone() for k, v in expected.items()}, tmp_path / "weights.safetensors")
    assert same_weights(pretrained.load_state(pretrained.resolve(str(tmp_path / "weights.safetensors"), None)), expected)


def test_a_pickled_model_is_never_unpickled(store, tmp_path):
    """A whole pickled model as a file is refused in one line, and a version an earlier platform
    registered as a pickled PyTorch model gives its run's best weights, or one line without them."""
    import mlflow
    import mlflow.pytorch

    client, run, bare, model, _ = store
    torch.save(model, tmp_path / "whole_model.pth")  # what MLflow's PyTorch flavor kept as data/model.pth
    with pytest.raises(ConfigError, match="init_from=.*whole_model.pth: whole_model.pth holds pickled objects") as error:
        pretrained.load_state(pretrained.resolve(str(tmp_path / "whole_model.pth"), client))
    assert "\n" not in str(error.value)

    with tracking.using_uri(client._tracking_client.tracking_uri):
        for logged_on in (run, bare):  # the earlier platform's way of logging the kept model
            with mlflow.start_run(run_id=logged_on):
                info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                                pip_requirements=["torch"])
            mlflow.register_model(info.model_uri, "mae")
    source = pretrained.resolve("models:/mae/2", client)
    assert source.weights is None and same_weights(pretrained.load_state(source, client), model.state_dict())
    with pytest.raises(ConfigError, match=f"init_from=models:/mae/3: its model is not in the platform's format "
                                          f".*never unpickled here, and its run {bare} logged no "
                                          f"checkpoints/best_model.pt to read instead; train it again"):
        pretrained.resolve("models:/mae/3", client)


@pytest.mark.parametrize("init_from, message", [
    ("0123456789abcdef0123456789abcdef", "no MLflow run 0123456789abcdef0123456789abcdef in this store"),
    ("models:/nope/1", "no registered model 'nope' in this MLflow store"),
    ("models:/mae/9", "model 'mae' has no version 9; it has 1"),
    ("models:/mae", "not a model URI"),
    ("/no/such/best_model.pt", "no such run or file"),
])
def test_init_from_that_points_nowhere_is_one_line(store, init_from, message):
    client = store[0]
    with pytest.raises(ConfigError, match=message) as error:
        pretrained.resolve(init_from, client)
    assert str(error.value).startswith(f"init_from={init_from}: ") and "\n" not in str(error.value)


def test_a_run_without_weights_is_refused(store):
    client, _, bare, _, _ = store
    with pytest.raises(ConfigError, match=f"run {bare} logged no checkpoints/best_model.pt"):
        pretrained.resolve(bare, client)


def test_matching_weights_load_and_new_parts_are_named(store):
    _, _, _, model, _ = store
    state = {f"encoder.{k}": v for k, v in model.state_dict().items()}
    fresh = registry.get("mae").build_model(config.build("mae", [{"model.depth": 1, "model.embed_dim": 32,
                                                                   "model.num_heads": 2, "model.decoder_dim": 32}]))
    untouched = pretrained.load_matching(fresh, state, prefix="encoder.")
    # The encoder came across; the narrower decoder did not, and is reported.
    assert torch.equal(fresh.patch_embed.proj.weight, model.patch_embed.proj.weight)
    assert "decoder_embed.weight" in untouched and "patch_embed.proj.weight" not in untouched
    with pytest.raises(ConfigError, match="none of the pretrained weights under 'nothing.' fit this model"):
        pretrained.load_matching(fresh, state, prefix="nothing.")
