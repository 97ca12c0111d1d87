"""pinn: the source-plane lensing layer, its physics loss and gradients in theta_E, the schedule, the CLIs."""

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from platform import config, registry
from platform import lensing as L
from platform.data import shards as shards_lib
from tasks.pinn import PhysicsConfig, lens_parameters, physics_loss, physics_weight, reconstruct
from platform.runner import data_and_settings
from tests.helpers import assert_figure, overfit_losses, run_cli, run_cli_here, tiny

f64 = torch.float64
TINY = ["model.backbone=resnet10t", "model.source_channels=4", "physics.source_pixels=16"]


# ---------------------------------------------------------------- lensing.py additions


def test_splatting_is_the_adjoint_of_grid_sample():
    # <sample(S, beta), I> = <S, splat(I, beta)> for every source S and image I: the splat sends
    # each ray's light exactly where grid_sample reads it from, rays off the grid included.
    g = torch.Generator().manual_seed(0)
    beta_x, beta_y = 0.7 * torch.randn(2, 2, 12, 12, generator=g, dtype=f64)  # some land off the +-0.6" grid
    image, source = torch.rand(2, 12, 12, generator=g, dtype=f64), torch.rand(2, 8, 8, generator=g, dtype=f64)
    flux, weight = L.splat_to_source_plane(image, beta_x, beta_y, 8, 0.15)
    assert flux.shape == weight.shape == (2, 8, 8)
    sampled = L.sample_source_plane(source, beta_x, beta_y, 0.15)  # (2, 12, 12)
    assert torch.allclose((sampled * image).sum(), (source * flux).sum(), rtol=1e-12)
    assert torch.allclose((sampled * 1.0).sum(), (source * weight).sum(), rtol=1e-12)


def test_splatting_keeps_the_light_of_rays_inside_the_grid():
    x, y = L.pixel_grid(10, 0.05, dtype=f64)  # +-0.225", inside the +-0.4" source grid
    image = torch.rand(3, 10, 10, dtype=f64)
    flux, weight = L.splat_to_source_plane(image, 0.9 * x + 0.01, 0.8 * y - 0.02, 8, 0.1)
    assert torch.allclose(flux.sum(dim=(1, 2)), image.sum(dim=(1, 2)), rtol=1e-12)
    assert torch.allclose(weight.sum(dim=(1, 2)), torch.full((3,), 100.0, dtype=f64), rtol=1e-12)


def test_splatting_gradcheck_in_float64():
    # Positions a fraction 0.2-0.8 into a pixel: away from the kinks where a ray crosses a pixel centre line.
    g = torch.Generator().manual_seed(1)
    cells = torch.randint(0, 4, (2, 2, 3, 3), generator=g).to(f64)
    fractions = 0.2 + 0.6 * torch.rand(2, 2, 3, 3, generator=g, dtype=f64)
    scale, n = 0.1, 5
    bx, by = ((cells + fractions) - (n - 1) / 2) * scale  # (2, 3, 3) each, in arcsec
    values = torch.rand(2, 3, 3, generator=g, dtype=f64)
    inputs = tuple(t.clone().requires_grad_() for t in (values, bx, by))
    assert torch.autograd.gradcheck(lambda v, x, y: L.splat_to_source_plane(v, x, y, n, scale), inputs)


def test_inverse_magnification_of_known_lenses():
    x, y = L.pixel_grid(81, 0.05, dtype=f64)
    r = torch.sqrt(x * x + y * y)
    away = r > 0.6  # finite differences need the deflection smooth over a pixel
    sis = L.inverse_magnification(*L.sis_deflection(x, y, 1.2), 0.05)
    assert torch.allclose(sis[away], (1 - 1.2 / r)[away], atol=0.01)
    point = L.inverse_magnification(*L.point_mass_deflection(x, y, 0.8, 0.0, 0.0), 0.05)  # (1, H, W)
    assert torch.allclose(point[0][away], (1 - 0.8**4 / r**4)[away], atol=0.03)
    # An isothermal ellipse has shear equal to convergence: det = 1 - 2 kappa, kappa = theta_E / (2 sqrt(q x^2 + y^2 / q)).
    q = 0.7
    sie = L.inverse_magnification(*L.sie_deflection(x, y, 1.2, q, 0.0), 0.05)
    kappa = 1.2 / (2 * torch.sqrt(q * x * x + y * y / q))
    assert torch.allclose(sie[away], (1 - 2 * kappa)[away], atol=0.02)
    # The critical curve (det = 0) of the SIS is its Einstein ring.
    row = sis[40].numpy()
    crossings = x[40].numpy()[np.flatnonzero(np.diff(np.sign(row)) != 0)]
    assert np.abs(np.abs(crossings[np.abs(crossings) > 0.5]) - 1.2).max() < 0.05


# ---------------------------------------------------------------- the physics loss


def ring(lens_model: str, theta_e: float = 1.2):
    """A noisy, PSF-blurred, min-max normalised image (1, 64, 64) of a Sersic source behind an SIS or SIE + shear."""
    x, y = L.pixel_grid(64, 0.1, dtype=f64)
    if lens_model == "sis":
        ax, ay = L.sis_deflection(x, y, theta_e)
    else:
        ax, ay = L.sie_deflection(x, y, theta_e, 0.75, 0.5)
        sx, sy = L.shear_deflection(x, y, 0.04, -0.02)
        ax, ay = ax + sx, ay + sy
    bx, by = L.ray_trace(x, y, ax, ay)
    image = L.sersic(bx, by, 1.0, 0.2, 1.0, 0.8, 0.3, 0.15, -0.1)[None]  # (1, H, W)
    image = L.convolve_fft(image, L.gaussian_psf_kernel(0.15, 0.1, 9, dtype=f64))
    image = image / image.max() + 0.04 * torch.randn(image.shape, generator=torch.Generator().manual_seed(2), dtype=f64)
    return ((image - image.min()) / (image.max() - image.min())).float()


def loss_and_gradient(image, lens_model: str, theta_e: float):
    physics = PhysicsConfig(lens_model=lens_model)
    lens = {"theta_e": torch.tensor([theta_e], requires_grad=True), "x0": torch.zeros(1), "y0": torch.zeros(1)}
    if lens_model == "sie":
        lens.update(q=torch.tensor([0.75]), phi=torch.tensor([0.5]))
    loss = physics_loss(reconstruct(image, lens, 0.1, physics), physics)[0]
    (gradient,) = torch.autograd.grad(loss, lens["theta_e"])
    return loss.item(), gradient.item()


@pytest.mark.parametrize("lens_model", ["sis", "sie"])
def test_physics_loss_is_lowest_at_the_true_theta_e_and_its_gradient_points_there(lens_model):
    image = ring(lens_model)
    at_truth, _ = loss_and_gradient(image, lens_model, 1.2)
    too_small, pull_up = loss_and_gradient(image, lens_model, 0.7 * 1.2)
    too_big, pull_down = loss_and_gradient(image, lens_model, 1.4 * 1.2)
    assert at_truth < 0.5 * min(too_small, too_big), (at_truth, too_small, too_big)
    assert math.isfinite(pull_up) and math.isfinite(pull_down)
    assert pull_up < 0 < pull_down, (pull_up, pull_down)  # descent moves theta_E towards 1.2 from both sides


def test_every_physics_term_has_a_finite_gradient_in_theta_e():
    theta_e = torch.tensor([1.0], requires_grad=True)
    lens = {"theta_e": theta_e, "x0": torch.zeros(1), "y0": torch.zeros(1)}
    terms = reconstruct(ring("sis"), lens, 0.1, PhysicsConfig())
    for name in ("compactness", "smoothness", "consistency"):
        (gradient,) = torch.autograd.grad(terms[name][0], theta_e, retain_graph=True)
        assert torch.isfinite(gradient).all() and gradient != 0, name


def test_lens_parameters_stay_in_their_ranges():
    physics = PhysicsConfig(lens_model="sie", shear=True, max_offset=0.1)
    raw = torch.tensor([[-50.0, 50.0, -50.0, 30.0, -40.0, 50.0, -50.0], [0.0] * 7])
    lens = lens_parameters(raw, physics, half_field=3.0)
    assert torch.allclose(lens["theta_e"], torch.tensor([0.2, 1.6]))
    assert lens["x0"][0] == pytest.approx(0.3) and lens["y0"][0] == pytest.approx(-0.3)
    assert lens["q"][0] == pytest.approx(0.3, abs=1e-6) and lens["q"][1] == pytest.approx(1.0, abs=1e-5)
    assert lens["g1"][0] == pytest.approx(0.3) and lens["g2"][0] == pytest.approx(-0.3)
    raw.requires_grad_()
    sum(v.sum() for v in lens_parameters(raw, physics, 3.0).values()).backward()
    assert torch.isfinite(raw.grad).all()  # also at raw = 0, where the ellipticity angle is undefined


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [2.0, 2.0, 2.0, 2.0, 2.0]),
    ("linear", [2 / 3, 4 / 3, 2.0, 2.0, 2.0]),
    ("cosine", [0.5, 1.5, 2.0, 2.0, 2.0]),
    ("step", [0.0, 0.0, 2.0, 2.0, 2.0]),
])
def test_physics_weight_per_schedule(schedule, expected):
    physics = PhysicsConfig(schedule=schedule, lambda_max=2.0, warmup_epochs=2)
    assert [physics_weight(e, physics, total_epochs=5) for e in range(5)] == pytest.approx(expected)


def test_a_warm_up_longer_than_the_run_still_ends_at_full_weight():
    physics = PhysicsConfig(schedule="step", lambda_max=1.0, warmup_epochs=10)
    assert [physics_weight(e, physics, total_epochs=3) for e in range(3)] == [0.0, 0.0, 1.0]
    physics = PhysicsConfig(schedule="linear", lambda_max=1.0, warmup_epochs=10)
    assert physics_weight(0, physics, total_epochs=1) == 1.0


# ---------------------------------------------------------------- the task


def test_loss_falls_when_overfitting_a_small_batch(tmp_path):
    task = registry.get("pinn")
    overrides = dict(item.split("=") for item in TINY)
    cfg = config.build("pinn", [{"data.cache_dir": str(tmp_path), "data.num_train": 32, "data.num_val": 8,
                                 "augment.strength": 0.0, **overrides}])
    splits, cfg = data_and_settings(task, cfg)
    assert cfg.physics.pixel_scale == pytest.approx(0.101)  # model_ii's, a layer of the config (and so logged)
    batch = task.collate(shards_lib.head(splits["train"], 16), cfg, True)
    assert batch["lens_truth"].shape == (16, 5)
    losses = overfit_losses(task, cfg, batch, epoch=1)
    assert losses[-1] < 0.3 * losses[0], losses
    outputs = {k: v.detach().numpy() for k, v in task.eval_step(task.build_model(cfg), batch, cfg).items()}
    assert {"theta_e_error", "theta_e_rel_error", "centre_error", "physics_loss"} <= set(task.evaluate(outputs, cfg))
    # Real images have no truth: no theta_E error, the rest as usual.
    del outputs["theta_e_true"]
    assert "theta_e_error" not in task.evaluate(outputs, cfg)


@pytest.mark.parametrize("args, message", [
    (["physics.schedule=exponential"],
     "error: physics.schedule=exponential is not allowed; expected one of constant|linear|cosine|step"),
    (["data.path=/data/deeplense"], "error: physics.pixel_scale is required with data.path=/data/deeplense"),
    (["physics.lambda_max=-1"], "error: physics.lambda_max=-1.0 is out of range; expected 0.0 <= physics.lambda_max"),
    (["model.backbone=resnet9000"], "error: model.backbone=resnet9000 is not a timm ResNet"),
])
def test_bad_pinn_settings_are_one_line(tmp_path, args, message):
    result = run_cli_here("platform.train", "task=pinn", *args, cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()


METRICS = ("accuracy", "auc_macro", "auc_no", "auc_sphere", "auc_vort", "loss", "physics_loss", "physics_compactness",
           "physics_smoothness", "physics_consistency", "theta_e_error", "theta_e_rel_error", "centre_error")


@pytest.mark.slow
def test_tune_pinn_through_the_cli(tmp_path):
    db = tmp_path / "mlflow.db"
    sweep = run_cli("platform.tune", "task=pinn", "scaling.num_workers=0",
                    "tune.num_samples=1", "train.epochs=2", "tune.name=pinn",
                    "physics.lens_model=sie", "physics.shear=true", *TINY, *tiny(tmp_path / "cache", db),
                    cwd=str(tmp_path))
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-4000:]
    assert "1 trials (0 failed)" in sweep.stdout
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-pinn").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'pinn'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    (trial,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert trial.data.params["physics.schedule"] in {"constant", "linear", "cosine", "step"}
    assert trial.data.params["physics.lens_model"] == "sie" and trial.data.params["physics.pixel_scale"] == "0.101"
    for metric in METRICS:
        history = client.get_metric_history(trial.info.run_id, f"val/{metric}")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
    plots = {a.path for a in client.list_artifacts(trial.info.run_id, "plots")}
    assert plots == {"plots/lensing.png", "plots/roc.png", "plots/gradcam.png", "plots/embeddings.png", "plots/test"}
    assert_figure(client, trial.info.run_id, "plots/gradcam.png")
