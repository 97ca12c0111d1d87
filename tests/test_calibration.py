"""The calibrated simulator presets against the figures measured on the real DeepLense files, read as a
user reads them: ``python -m platform.data`` prints each figure beside its target."""

import re

import numpy as np
import pytest

from platform.data import calibration, lenses
from tests.helpers import run_cli_here


def off_targets(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip().startswith("OFF ")]


def measured(stdout: str, key: str) -> list[float]:
    line = next(line for line in stdout.splitlines() if re.match(rf"\s*(ok |OFF) {re.escape(key)}\s", line))
    return [float(v) for v in line.split()[2:line.split().index("target")]]


def test_the_statistics_measure_what_they_name():
    """Known images: Gaussian sky of sigma 1 under a bright centred disk of radius 6 px, peaked, a 3x3
    neighbour in a corner, min-max normalised. The figures must come back as built."""
    rng = np.random.default_rng(0)
    h = 64
    yy, xx = np.mgrid[:h, :h]
    disk = np.hypot(yy - 31.5, xx - 31.5) <= 6  # 113 of the central 576 pixels
    images = rng.normal(0, 1, (200, 1, h, h))
    images[:, 0, disk] += 40.0
    images[:, 0] += 20.0 * np.exp(-np.hypot(yy - 32, xx - 32) ** 2 / 2)  # its peak at the centre
    images[:, 0, 5:8, 5:8] += 30.0  # 9 of the 3,520 pixels outside the centre
    lo, hi = images.min(axis=(2, 3), keepdims=True), images.max(axis=(2, 3), keepdims=True)
    images = (images - lo) / (hi - lo)
    stats = calibration.image_statistics(images, np.zeros(200, np.int64), ("all",))
    expected_sigma = 1 / float(np.median(hi - lo))
    assert stats["noise"][0] == pytest.approx(expected_sigma, rel=0.05)
    assert stats["background"][0] == pytest.approx(float(np.median(-lo[:, 0, 0, 0] / (hi - lo)[:, 0, 0, 0])), rel=0.05)
    assert stats["bright_centre"][0] == pytest.approx(disk.sum() / 576, abs=0.005)
    assert stats["neighbours"][0] == pytest.approx(9 / (h * h - 576), abs=0.001)
    assert stats["brightest_near_centre"] == 1.0 and stats["min"][0] == 0 and stats["max"][0] == 1
    assert stats["ring_radius"] == pytest.approx(np.median(np.hypot(yy - 31.5, xx - 31.5)[disk]), abs=1.5)


@pytest.mark.slow
def test_the_hsc_preset_matches_the_real_cutouts_figures(tmp_path):
    # 1,500 images, one in five a lens: a few hundred of each class, so each class's figures are
    # within a few percent of the preset's own.
    result = run_cli_here("platform.data", "task=lens_finding", "data.num_train=1500", "data.num_val=20",
                          "sim.train_positive_fraction=0.2", "sim.val_positive_fraction=0.2",
                          f"data.cache_dir={tmp_path}", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "beside the targets of preset hsc" in result.stdout
    assert off_targets(result.stdout) == [], result.stdout
    for target in calibration.TARGETS["hsc"]:  # every figure printed
        assert measured(result.stdout, target.key)
    # The real files' bands differ: g (bluest) the faintest, so its sky sits highest after normalisation.
    g, r, i = measured(result.stdout, "background")
    assert g > r > i


def test_the_test1_preset_matches_common_test_one(tmp_path):
    result = run_cli_here("platform.data", "task=classification", "data.preset=test1", "data.num_train=300",
                          "data.num_val=3", f"data.cache_dir={tmp_path}", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "beside the targets of preset test1" in result.stdout
    assert off_targets(result.stdout) == [], result.stdout
    assert 20 <= measured(result.stdout, "ring_radius")[0] <= 26


def test_the_uncalibrated_preset_is_told_apart():
    """The check can fail: the ``ideal`` preset (one maximum over the bands, little noise, no
    neighbours) is off the real figures, named by figure."""
    images, truth = lenses.simulate_lenses(120, 0.25, seed=0, preset="ideal")
    rows = calibration.compare(calibration.image_statistics(images, truth["label"], lenses.CLASS_NAMES), "hsc")
    off = {row.target.key for row in rows if not row.ok}
    assert {"max", "background", "noise", "neighbours"} <= off


def test_an_unknown_lens_preset_is_one_line(tmp_path):
    result = run_cli_here("platform.data", "task=lens_finding", "data.preset=model_i", f"data.cache_dir={tmp_path}",
                          cwd=str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip() == "error: data.preset=model_i is not a lens-finding preset; expected one of hsc, ideal"
