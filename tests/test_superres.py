"""superres: PSNR/SSIM, the degradation, paired HR/LR data (simulated and real folders), SRResNet, the real CLIs."""

import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from platform import config, metrics, registry
from platform import data as data_lib
from platform.data import DataError, folders
from platform.data import shards as shards_lib
from platform.plots import radial_power_spectrum
from tasks.superres import SRResNet, bicubic, degrade, dihedral_pairs
from tests.helpers import overfit_losses, run_cli, run_cli_here, tiny

METRICS = ("psnr", "ssim", "mse", "bicubic_psnr", "bicubic_ssim", "bicubic_mse", "psnr_gain")
SMALL = ["data.preset=model_ii", "model.blocks=2", "model.channels=16"]


def blobs(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth, noise-free test images (n, 1, size, size) in [0, 1]: a few Gaussian spots each."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        for _ in range(4):
            (cx, cy), s, a = rng.uniform(4, size - 4, 2), rng.uniform(0.8, 2.5), rng.uniform(0.3, 1)
            out[i, 0] += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return np.clip(out, 0, 1)


# ---------------------------------------------------------------------------- metrics


def test_psnr_of_a_known_error_and_of_identical_images():
    target = np.random.default_rng(0).uniform(0.2, 0.8, (3, 1, 20, 20))
    assert metrics.mse(target + 0.1, target) == pytest.approx([0.01] * 3)
    assert metrics.psnr(target + 0.1, target) == pytest.approx([20.0] * 3)  # 10 log10(1 / 0.01)
    assert metrics.psnr(target + 0.01, target) == pytest.approx([40.0] * 3)
    assert metrics.psnr(target, target) == pytest.approx([100.0] * 3)  # capped, so a mean stays finite
    assert metrics.ssim(target, target) == pytest.approx([1.0] * 3)


def test_ssim_is_the_gaussian_windowed_formula_of_wang_et_al():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1, (2, 1, 16, 16)), rng.uniform(0, 1, (2, 1, 16, 16))
    y[1] = 0.5 * x[1] + 0.2  # a structurally similar pair, besides an unrelated one
    offsets = np.arange(-5, 6)
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()  # the 11 x 11 Gaussian window, sigma 1.5
    c1, c2 = 0.01**2, 0.03**2
    expected = []
    for a, b in zip(x[:, 0], y[:, 0]):
        values = []
        for i in range(5, 11):  # every pixel whose window lies inside the 16 x 16 image
            for j in range(5, 11):
                pa, pb = a[i - 5:i + 6, j - 5:j + 6], b[i - 5:i + 6, j - 5:j + 6]
                ma, mb = (window * pa).sum(), (window * pb).sum()
                va, vb = (window * (pa - ma) ** 2).sum(), (window * (pb - mb) ** 2).sum()
                cov = (window * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        expected.append(np.mean(values))
    assert metrics.ssim(x, y) == pytest.approx(expected, abs=1e-10)
    assert metrics.ssim(y, x) == pytest.approx(expected, abs=1e-10)  # symmetric
    # Flat images have no structure: SSIM is the luminance term alone.
    flat = metrics.ssim(np.full((1, 1, 12, 12), 0.2), np.full((1, 1, 12, 12), 0.6))
    assert flat == pytest.approx([(2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)])


def test_more_noise_means_lower_ssim_and_psnr():
    clean = blobs(4, 32, seed=2).astype(np.float64)
    rng = np.random.default_rng(3)
    noisy = [clean + sigma * rng.standard_normal(clean.shape) for sigma in (0.01, 0.05, 0.2)]
    ssims = [metrics.ssim(n, clean) for n in noisy]
    psnrs = [metrics.psnr(n, clean) for n in noisy]
    assert np.all(ssims[0] < 1) and np.all(ssims[0] > ssims[1]) and np.all(ssims[1] > ssims[2])
    assert np.all(psnrs[0] > psnrs[1]) and np.all(psnrs[1] > psnrs[2])


def test_radial_power_spectrum_of_white_noise_and_of_a_wave():
    noise = np.random.default_rng(4).normal(0, 0.1, (64, 1, 64, 64))
    k, power = radial_power_spectrum(noise)
    assert k[0] == 0 and k[-1] == pytest.approx(0.5) and np.allclose(k[1:] - k[:-1], 1 / 64)
    assert np.allclose(power[1:], 0.01, rtol=0.15)  # flat at sigma^2
    y, x = np.mgrid[:64, :64]
    k, power = radial_power_spectrum(np.cos(2 * np.pi * (8 * x + 6 * y) / 64)[None])  # |k| = 10 / 64
    assert k[1 + np.argmax(power[1:])] == pytest.approx(10 / 64)


# ---------------------------------------------------------------------------- degradation and pairs


def test_degradation_averages_blocks_keeps_flat_sky_flat_and_seeds_its_noise():
    hr = blobs(3, 32, seed=5)
    lr = degrade(hr, 2, 0.0, 0.0, 0.05, seed=0)
    assert lr.shape == (3, 1, 16, 16) and lr.dtype == np.float32
    assert np.allclose(lr, hr.reshape(3, 1, 16, 2, 16, 2).mean(axis=(3, 5)), atol=1e-6)  # area downsampling
    flat = np.full((2, 1, 32, 32), 0.3, np.float32)
    assert np.allclose(degrade(flat, 4, 0.2, 0.0, 0.05, seed=0), 0.3, atol=1e-6)  # the blur does not darken the edges
    noisy = degrade(hr, 2, 0.1, 0.05, 0.05, seed=7)
    assert np.array_equal(noisy, degrade(hr, 2, 0.1, 0.05, 0.05, seed=7))
    assert not np.array_equal(noisy, degrade(hr, 2, 0.1, 0.05, 0.05, seed=8))
    assert np.std(noisy - degrade(hr, 2, 0.1, 0.0, 0.05, seed=7)) == pytest.approx(0.05, rel=0.1)


def test_augmentation_turns_hr_and_lr_alike_so_pairs_stay_pairs():
    hr = blobs(16, 32, seed=6)
    lr = degrade(hr, 2, 0.15, 0.0, 0.05, seed=0)
    hr2, lr2 = dihedral_pairs(hr, lr, 1.0, np.random.default_rng(0))
    assert not np.array_equal(hr2, hr)
    # The degradation commutes with the flips and rotations: a turned pair is still a pair.
    assert np.allclose(degrade(hr2, 2, 0.15, 0.0, 0.05, seed=0), lr2, atol=1e-5)


def test_simulated_pairs_are_the_degraded_hr_and_cached_by_every_setting(tmp_path):
    task = registry.get("superres")
    settings = {"data.cache_dir": str(tmp_path), "data.preset": "model_ii", "data.num_train": 8, "data.num_val": 4}
    cfg = config.build("superres", [settings])
    splits = task.build_data(cfg)
    hr, columns = shards_lib.read(splits["train"])
    assert hr.shape == (8, 1, 64, 64) and columns["lr"].shape == (8, 1, 32, 32)
    assert hr.min() >= 0 and hr.max() <= 1  # as simulated
    noise_seed = int(np.random.SeedSequence([data_lib.split_seed(0, "train"), 0x5352]).generate_state(1)[0])
    assert np.array_equal(columns["lr"], degrade(hr, 2, 0.1, 0.01, 0.101, noise_seed))
    assert task.build_data(cfg)["train"].path == splits["train"].path  # reused
    other = task.build_data(config.build("superres", [{**settings, "degrade.noise_sigma": 0.02}]))
    assert other["train"].path != splits["train"].path

    batch = task.collate(shards_lib.head(splits["train"], 4), cfg, True)
    assert batch["lr"].shape == (4, 1, 32, 32) and batch["hr"].shape == (4, 1, 64, 64)


def write_pairs(root, n: int = 6, size: int = 32, factor: int = 2):
    hr = blobs(n, size, seed=8)
    lr = degrade(hr, factor, 0.1, 0.0, 0.05, seed=0)
    for folder in ("HR", "LR"):
        (root / folder).mkdir(parents=True)
    for i in range(n):
        np.save(root / "HR" / f"img{i}.npy", hr[i, 0].astype(np.float64))  # (H, W), as DeepLense stores them
        np.save(root / "LR" / f"img{i}.npy", lr[i])  # (1, h, w)
    return hr, lr


def test_a_real_pairs_folder_is_split_once_and_reused(tmp_path, monkeypatch):
    hr, lr = write_pairs(tmp_path / "pairs")
    splits = data_lib.from_pairs(str(tmp_path / "pairs"), str(tmp_path / "cache"), 100, 0.2, 0.2, seed=0)
    assert (splits["train"].num_rows, splits["val"].num_rows, splits["test"].num_rows) == (4, 1, 1)
    rows = {split: shards_lib.read(shards) for split, shards in splits.items()}
    assert sorted(f for _, columns in rows.values() for f in columns["file"]) == [f"img{i}.npy" for i in range(6)]
    found_hr = np.concatenate([rows[split][0] for split in data_lib.SPLITS])
    found_lr = np.concatenate([rows[split][1]["lr"] for split in data_lib.SPLITS])
    order = np.argsort(found_hr.sum(axis=(1, 2, 3)))
    assert np.allclose(found_hr[order], hr[np.argsort(hr.sum(axis=(1, 2, 3)))])  # every pair, once
    assert np.allclose(degrade(found_hr, 2, 0.1, 0.0, 0.05, seed=0), found_lr, atol=1e-5)  # each HR with its own LR

    monkeypatch.setattr(folders, "read_pairs", lambda root: pytest.fail("the cached pairs were read again"))
    again = data_lib.from_pairs(str(tmp_path / "pairs"), str(tmp_path / "cache"), 100, 0.2, 0.2, seed=0)
    assert again["val"].path == splits["val"].path


def test_bad_pairs_folders_are_one_line_errors(tmp_path):
    write_pairs(tmp_path / "lonely")
    (tmp_path / "lonely" / "LR" / "img3.npy").unlink()
    with pytest.raises(DataError, match=r"1 file\(s\) without a partner, e.g. img3.npy is not in \S+/LR;"):
        folders.paired_files(str(tmp_path / "lonely"))

    write_pairs(tmp_path / "pickled")
    np.save(tmp_path / "pickled" / "HR" / "img0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="img0.npy: not a readable .npy array"):
        folders.read_pairs(str(tmp_path / "pickled"))

    write_pairs(tmp_path / "archive")
    np.savez(tmp_path / "archive" / "LR" / "extra.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="extra.npz: not a .npy file"):
        folders.paired_files(str(tmp_path / "archive"))

    # Through the task, as the CLI meets them: an HR folder twice the LR's size is not a x4 pair.
    task = registry.get("superres")
    write_pairs(tmp_path / "x2")
    for name, setting, message in (("lonely", {}, "without a partner"),
                                   ("x2", {"degrade.factor": 4}, "HR 32x32 is not degrade.factor=4 times LR 16x16; "
                                                                 "set degrade.factor=2")):
        settings = {"data.path": str(tmp_path / name), "data.cache_dir": str(tmp_path / "c"), **setting}
        with pytest.raises(DataError, match=message) as error:
            task.build_data(config.build("superres", [settings]))
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------- model and training


@pytest.mark.parametrize("factor", [2, 4])
def test_srresnet_starts_exactly_at_bicubic(factor):
    torch.manual_seed(0)
    model = SRResNet(factor, blocks=2, channels=8).eval()
    lr = torch.rand(2, 1, 12, 12)  # (B, 1, h, w)
    sr = model(lr)
    assert sr.shape == (2, 1, 12 * factor, 12 * factor) and torch.equal(sr, bicubic(lr, factor))
    assert len(model.upsample) == int(math.log2(factor))


def test_loss_falls_when_overfitting_a_small_batch():
    task = registry.get("superres")
    cfg = config.build("superres", [{"model.blocks": 2, "model.channels": 16}])
    hr = blobs(8, 32, seed=9)
    # Noise-free, blurred LR: what bicubic misses is all learnable.
    batch = {"lr": torch.from_numpy(degrade(hr, 2, 0.15, 0.0, 0.05, seed=0)), "hr": torch.from_numpy(hr)}
    losses = overfit_losses(task, cfg, batch, steps=30, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_evaluation_reports_the_gain_over_bicubic():
    task = registry.get("superres")
    cfg = config.build("superres", [{}])
    hr = torch.from_numpy(blobs(4, 32, seed=10))
    lr = torch.from_numpy(degrade(hr.numpy(), 2, 0.1, 0.0, 0.05, seed=0))
    outputs = task.eval_step(lambda x: hr, {"lr": lr, "hr": hr}, cfg)  # a perfect "model"
    assert all(v.shape == (4,) for v in outputs.values())
    result = task.evaluate(outputs, cfg)
    assert set(result) == set(METRICS)
    assert result["psnr"] == pytest.approx(100.0) and result["ssim"] == pytest.approx(1.0)
    assert result["bicubic_psnr"] < 45 and result["psnr_gain"] == pytest.approx(100.0 - result["bicubic_psnr"])


@pytest.mark.parametrize("setting, message", [
    ("degrade.factor=3", "error: degrade.factor=3 is not a power of 2; SRResNet upsamples in x2 PixelShuffle stages"),
    ("degrade.factor=4", "error: degrade.factor=4 does not divide the 150-pixel images of data.preset=model_i; "
                         "use one of 2, 3, 5, 6, ..."),
    ("degrade.psf_fwhm=-0.1", "error: degrade.psf_fwhm=-0.1 is out of range; expected 0.0 <= degrade.psf_fwhm"),
])
def test_bad_superres_settings_are_one_line(tmp_path, setting, message):
    result = run_cli_here("platform.train", "task=superres", setting, f"data.cache_dir={tmp_path}/cache", cwd=str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_tune_superres_on_a_pairs_folder_through_the_cli(tmp_path):
    db = tmp_path / "mlflow.db"
    write_pairs(tmp_path / "pairs", n=40)
    sweep = run_cli("platform.tune", "task=superres", "scaling.num_workers=0",
                    "tune.num_samples=1", "train.epochs=2", "tune.name=sr",
                    f"data.path={tmp_path}/pairs", "data.val_fraction=0.25", *SMALL, *tiny(tmp_path / "cache", db),
                    cwd=str(tmp_path))
    assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-4000:]
    assert "1 trials (0 failed)" in sweep.stdout
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("deeplense-superres").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`platform.sweep` = 'sr'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    (trial,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    for metric in METRICS:
        history = client.get_metric_history(trial.info.run_id, f"val/{metric}")
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), metric
    assert {a.path for a in client.list_artifacts(trial.info.run_id, "plots")} == {"plots/panels.png",
                                                                                  "plots/power_spectrum.png", "plots/test"}
    # The pairs held out for test, scored once with the best weights: in their own folder.
    assert {a.path for a in client.list_artifacts(trial.info.run_id, "plots/test")} == {"plots/test/panels.png",
                                                                                       "plots/test/power_spectrum.png"}
    assert all(math.isfinite(trial.data.metrics[f"test/{metric}"]) for metric in METRICS)
