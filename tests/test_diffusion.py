"""diffusion: noise schedules, the DDIM/DDPM sampler, EMA, slerp, FID, through the real CLIs.

The real Inception weights cannot be downloaded here (no network): FID is computed in the
feature space of a tiny extractor that tests/fid_extractor.py registers with torch-fidelity
(plugged in with fid.extractor_module=tests.fid_extractor), or of the task's offline proxy.
"""

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from platform import config, registry
from platform.config import ConfigError
from platform.data import shards as shards_lib
from tasks.diffusion import (INCEPTION, PROXY, alpha_bars, ddim_sample, ddim_step, fid_features, frechet_distance,
                             frechet_distance_of_features, resolve_feature_extractor, slerp, update_ema)
from platform.runner import data_and_settings
from tests import fid_extractor
from tests.helpers import overfit_losses, run_cli, run_cli_here, tiny

SMALL = {"model.channels": 16, "model.img_size": 16, "model.channel_mults": [1, 2], "model.dropout": 0.0}
SMALL_CLI = ["model.channels=16", "model.img_size=16", "model.channel_mults=[1,2]", "diffusion.sample_steps=4"]
PLUGGED = ["fid.extractor_module=tests.fid_extractor", f"fid.feature_extractor={fid_extractor.NAME}"]


def test_schedules_follow_their_definitions():
    linear = alpha_bars("linear", 1000)
    betas = 1 - linear / np.concatenate([[1.0], linear[:-1]])
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)  # Ho et al.
    # another T spans about the same noise levels
    assert np.log(alpha_bars("linear", 100)[-1]) == pytest.approx(np.log(linear[-1]), rel=0.1)
    cosine, s = alpha_bars("cosine", 1000), 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 500, 900):  # abar telescopes to f(t + 1) / f(0)
        assert cosine[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    for abar in (linear, cosine):
        assert np.all(np.diff(abar) < 0) and 0 < abar[-1] < 1e-3


def test_ddim_step_at_eta_1_is_the_ddpm_posterior():
    abar = torch.tensor(alpha_bars("linear", 1000), dtype=torch.float64)
    t = 600
    a, a_prev = abar[t], abar[t - 1]
    beta = 1 - a / a_prev
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    mean, sigma = ddim_step(x_t, eps, a, a_prev, eta=1.0, clip=False)
    # q(x_{t-1} | x_t, x0) (Ho et al., eq. 7)
    posterior_mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x_t
    assert torch.allclose(mean, posterior_mean) and sigma**2 == pytest.approx(float(beta * (1 - a_prev) / (1 - a)))
    mean, sigma = ddim_step(x_t, eps, a, a_prev, eta=0.0, clip=False)
    assert sigma == 0 and torch.allclose(mean, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)  # DDIM keeps eps


@pytest.mark.parametrize("schedule, eta, steps", [("cosine", 0.0, 100), ("linear", 1.0, 1000)])
def test_sampler_with_the_exact_denoiser_reproduces_gaussian_data(schedule, eta, steps):
    # For data ~ N(m, s^2) the optimal noise prediction is known in closed form.
    abar, m, s = torch.tensor(alpha_bars(schedule, 1000), dtype=torch.float64), 0.3, 0.5

    def eps_fn(x, t):
        a = abar[t][:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s**2 + 1 - a)

    noise = torch.randn((20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    x = ddim_sample(eps_fn, abar, noise, steps, eta, torch.Generator().manual_seed(1), clip=False)
    assert x.mean().item() == pytest.approx(m, abs=0.015) and x.std().item() == pytest.approx(s, rel=0.02)


def test_slerp_keeps_the_ends_and_the_sphere():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.6, 0.8])
    path = slerp(a, b, torch.linspace(0, 1, 9))  # (9, 3)
    assert torch.allclose(path[0], a, atol=1e-6) and torch.allclose(path[-1], b, atol=1e-6)
    assert torch.allclose(path.norm(dim=1), torch.ones(9), atol=1e-6)  # a straight line would dip to 0.71
    assert torch.allclose(path[4], (a + b) / math.sqrt(2), atol=1e-6)  # orthogonal ends: the midpoint of the arc
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert slerp(z[0], z[1], torch.tensor([0.0, 0.3])).shape == (2, 1, 8, 8)
    assert torch.allclose(slerp(a, a, torch.tensor([0.5]))[0], a)  # one direction: no 0/0


@pytest.mark.parametrize("extractor", [fid_extractor.NAME, PROXY])
def test_fid_is_zero_for_one_set_and_grows_with_a_shift(extractor):
    rng = np.random.default_rng(0)
    real = np.clip(rng.normal(-0.5, 0.2, (64, 1, 16, 16)), -1, 1).astype(np.float32)
    same = frechet_distance(real, real.copy(), extractor)
    near = frechet_distance(real, np.clip(real + 0.1, -1, 1), extractor)
    far = frechet_distance(real, np.clip(real + 0.4, -1, 1), extractor)
    assert abs(same) < 1e-3 * far and same < near < far, (same, near, far)


def test_fid_from_features_embedded_per_batch_is_torch_fidelitys_own():
    """eval_step embeds each worker's images where they are; the FID of the gathered features is
    the number torch-fidelity computes from the whole image sets in one call."""
    import torch_fidelity

    rng = np.random.default_rng(1)
    real = np.clip(rng.normal(-0.5, 0.2, (40, 1, 16, 16)), -1, 1).astype(np.float32)
    generated = np.clip(real[:30] + rng.normal(0.1, 0.1, (30, 1, 16, 16)), -1, 1).astype(np.float32)

    class Images(torch.utils.data.Dataset):  # torch-fidelity's input: uint8 RGB (3, H, W) one at a time
        def __init__(self, images):
            self.pixels = torch.from_numpy(np.round((images + 1) * 127.5).astype(np.uint8)).expand(-1, 3, -1, -1)

        def __len__(self):
            return len(self.pixels)

        def __getitem__(self, i):
            return self.pixels[i]

    theirs = torch_fidelity.calculate_metrics(input1=Images(generated), input2=Images(real), fid=True, cuda=False,
                                              feature_extractor=PROXY, save_cpu_ram=True, cache=False, verbose=False)
    batches = [fid_features(torch.from_numpy(x), PROXY).numpy() for x in (real[:16], real[16:], generated[:7], generated[7:])]
    mine = frechet_distance_of_features(np.concatenate(batches[:2]), np.concatenate(batches[2:]))
    assert mine == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-4)


def test_ema_starts_fast_then_settles_at_its_decay(tmp_path):
    cfg = config.build("diffusion", [SMALL])
    model = registry.get("diffusion").build_model(cfg)
    assert not any(p.requires_grad for p in model.ema.parameters())  # no optimizer or DDP gradient for it
    start = [p.clone() for p in model.ema.parameters()]
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    update_ema(model, decay=0.999)  # first update: d = min(0.999, 2 / 11)
    for e, s, p in zip(model.ema.parameters(), start, model.net.parameters()):
        assert torch.allclose(e, 2 / 11 * s + 9 / 11 * p, atol=1e-6)
    model.ema_updates.fill_(10**6)
    before = [p.clone() for p in model.ema.parameters()]
    update_ema(model, decay=0.999)
    for e, b, p in zip(model.ema.parameters(), before, model.net.parameters()):
        assert torch.allclose(e, 0.999 * b + 0.001 * p, atol=1e-6)


def test_loss_falls_when_overfitting_a_small_batch(tmp_path):
    task = registry.get("diffusion")
    cfg = config.build("diffusion", [{"data.cache_dir": str(tmp_path), "data.num_train": 32, "data.num_val": 8,
                                      "augment.strength": 0.0, **SMALL}])
    splits, cfg = data_and_settings(task, cfg)
    batch = task.collate(shards_lib.head(splits["train"], 16), cfg, True)
    assert batch["image"].shape == (16, 1, 16, 16) and -1 <= batch["image"].min() < batch["image"].max() <= 1
    losses = overfit_losses(task, cfg, batch, steps=30, lr=2e-3)
    # t is drawn anew every step, so single losses jitter: compare the ends on average
    assert np.mean(losses[-5:]) < 0.35 * np.mean(losses[:5]), losses


def test_validation_draws_the_same_noise_for_the_same_image_every_time(tmp_path):
    task = registry.get("diffusion")
    cfg = config.build("diffusion", [{"data.cache_dir": str(tmp_path), "data.num_train": 8, "data.num_val": 8,
                                      "diffusion.sample_steps": 3, "diffusion.eta": 1.0, **SMALL}])
    splits, cfg = data_and_settings(task, cfg)
    model = task.build_model(cfg).eval()
    batch = task.collate(shards_lib.head(splits["val"], 6), cfg, False)
    with torch.no_grad():
        first, again = task.eval_step(model, batch, cfg), task.eval_step(model, batch, cfg)
        # the same images in another order and batch: each keeps its own noise and t
        order = torch.tensor([4, 1, 0])
        shuffled = task.eval_step(model, {"image": batch["image"][order]}, cfg)
    for key in ("loss", "generated"):
        assert torch.equal(first[key], again[key])
    assert torch.allclose(shuffled["loss"], first["loss"][order])
    assert first["generated"].shape == (6, 1, 16, 16) and torch.isfinite(first["generated"]).all()
    metrics = task.evaluate({k: v.numpy() for k, v in first.items()}, cfg)
    assert set(metrics) == {"fid", "loss"} and all(math.isfinite(v) for v in metrics.values())

    cfg.fid.sample_fraction = 0.5  # a fixed subset of the images gets a sample
    with torch.no_grad():
        half, again = task.eval_step(model, batch, cfg), task.eval_step(model, batch, cfg)
    assert 0 < len(half["generated"]) < 6 and torch.equal(half["generated"], again["generated"])


def test_feature_extractor_auto_never_downloads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    cfg = config.build("diffusion", [{}])
    assert resolve_feature_extractor(cfg) == {"fid.feature_extractor": PROXY, "fid.weights_path": ""}
    assert cfg.fid.feature_extractor == "auto"  # what the task decides is a layer the core applies
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "fid.weights_path=/path/to/pt_inception-2015-12-05-6726825d.pth" in warning

    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # never loaded here: only found
    cfg = config.build("diffusion", [{}])
    assert resolve_feature_extractor(cfg) == {"fid.feature_extractor": INCEPTION, "fid.weights_path": str(cached)}

    cfg = config.build("diffusion", [{"fid.extractor_module": "tests.fid_extractor",
                                      "fid.feature_extractor": fid_extractor.NAME}])
    assert resolve_feature_extractor(cfg)["fid.feature_extractor"] == fid_extractor.NAME
    cfg = config.build("diffusion", [{"fid.extractor_module": "tests.no_such_module"}])
    with pytest.raises(ConfigError, match="fid.extractor_module=tests.no_such_module cannot be imported"):
        resolve_feature_extractor(cfg)


@pytest.mark.parametrize("setting, message", [
    ("model.attention_res=5", "error: model.attention_res=5 is not a feature-map size of this U-Net; "
                              "expected 0 (none) or one of 32|16|8"),
    ("diffusion.sample_steps=2000", "error: diffusion.sample_steps=2000 is more than diffusion.timesteps=1000"),
    ("diffusion.schedule=quadratic", "error: diffusion.schedule=quadratic is not allowed; expected one of linear|cosine"),
    ("fid.feature_extractor=inception", "error: fid.feature_extractor=inception is not a torch-fidelity feature "
                                        "extractor; expected one of auto|clip-rn101|"),
    ("fid.weights_path=/no/such/weights.pth", "error: fid.weights_path=/no/such/weights.pth does not exist"),
])
def test_bad_diffusion_settings_are_one_line(tmp_path, setting, message):
    result = run_cli_here("platform.train", "task=diffusion", setting, f"data.cache_dir={tmp_path}/cache", cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_tune_diffusion_through_the_cli(tmp_path):
    db = tmp_path / "mlflow.db"
    # The registered test extractor stands in for Inception (no weights here); `auto` falling back
    # to the offline proxy is test_feature_extractor_auto_never_downloads.
    result = run_cli("platform.tune", "task=diffusion", "scaling.num_workers=0",
                     "tune.num_samples=1", "train.epochs=2", "tune.name=dd",
                     *SMALL_CLI, *PLUGGED, *tiny(tmp_path / "cache", db), cwd=str(tmp_path),
                     env={"TORCH_HOME": str(tmp_path / "torch")})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "1 trials (0 failed)" in result.stdout
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-diffusion").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'dd'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.params["fid.feature_extractor"] == fid_extractor.NAME for r in runs)
    (trial,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    for metric in ("fid", "loss"):
        history = client.get_metric_history(trial.info.run_id, f"val/{metric}")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
    plots = {a.path for a in client.list_artifacts(trial.info.run_id, "plots")}
    assert plots == {"plots/samples.png", "plots/slerp_walk.png", "plots/test"}  # test/: the best trial's test split
