"""Datasets: simulated shards reused by manifest, real DeepLense folders read strictly, the data CLI."""

import os

import numpy as np
import pytest

from platform import config, data
from platform.data import DataError, shards as shards_lib
from tests.helpers import run_cli


def make_deeplense_folder(root, per_class=3, shape=(1, 32, 32), names=("no", "sphere", "vort"), splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                np.save(folder / f"{i}.npy", rng.random(shape))  # float64 in [0, 1], as DeepLense ships them
    return root


def test_simulated_dataset_is_deterministic_and_reused(tmp_path):
    first = data.simulated("model_ii", 12, seed=3, root=str(tmp_path / "a"), shard_size=5)
    again = data.simulated("model_ii", 12, seed=3, root=str(tmp_path / "b"), shard_size=5)
    assert first.manifest["content_hash"] == again.manifest["content_hash"]
    assert len(first.files) == 3 and first.num_rows == 12 and first.image_shape == (1, 64, 64)
    assert sum(first.manifest["counts"]) == 12 and first.manifest["preset"] == "model_ii"
    mtime = os.path.getmtime(first.files[0])
    reused = data.simulated("model_ii", 12, seed=3, root=str(tmp_path / "a"), shard_size=5)
    assert os.path.getmtime(reused.files[0]) == mtime  # manifest matched: nothing regenerated
    other = data.simulated("model_ii", 12, seed=4, root=str(tmp_path / "a"), shard_size=5)
    assert other.manifest["content_hash"] != first.manifest["content_hash"]
    images, columns = shards_lib.read(first)
    assert images.shape == (12, 1, 64, 64) and 0.0 <= images.min() and images.max() <= 1.0
    for truth in ("label", "theta_e", "source_x", "source_y", "ellipticity", "shear", "shear_angle", "n_subhalos", "vortex_mass"):
        assert len(columns[truth]) == 12, truth


def test_damaged_shards_are_regenerated(tmp_path):
    shards = data.simulated("model_ii", 6, seed=0, root=str(tmp_path), shard_size=6)
    with open(shards.files[0], "ab") as f:
        f.write(b"garbage")
    again = data.simulated("model_ii", 6, seed=0, root=str(tmp_path), shard_size=6)
    assert again.manifest["content_hash"] == shards.manifest["content_hash"]
    assert os.path.getsize(again.files[0]) == again.manifest["files"][0]["bytes"]


def test_real_folder_with_aliases_and_2d_files(tmp_path):
    root = make_deeplense_folder(tmp_path / "real", shape=(32, 32), names=("no_substructure", "subhalo", "vortex"))
    splits = data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)
    assert splits["train"].num_rows == 9 and splits["val"].num_rows == 9
    assert splits["train"].image_shape == (1, 32, 32) and splits["train"].manifest["counts"] == [3, 3, 3]
    images, columns = shards_lib.read(splits["train"])
    original = np.load(root / "train" / "subhalo" / "0.npy")
    assert np.allclose(images[columns["label"] == 1][0, 0], original, atol=1e-7)


def test_corrupt_file_is_named(tmp_path):
    root = make_deeplense_folder(tmp_path / "real")
    (root / "val" / "vort" / "1.npy").write_bytes(b"\x93NUMPY this is not an array")
    with pytest.raises(DataError, match=r"val/vort/1\.npy: not a readable \.npy array"):
        data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)


def test_pickled_object_array_is_refused(tmp_path):
    root = make_deeplense_folder(tmp_path / "real")
    np.save(root / "train" / "no" / "0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"train/no/0\.npy: not a readable \.npy array"):
        data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)


def test_misshaped_file_names_shape_found(tmp_path):
    root = make_deeplense_folder(tmp_path / "real")
    np.save(root / "train" / "sphere" / "2.npy", np.zeros((1, 16, 16)))
    with pytest.raises(DataError, match=r"train/sphere/2\.npy: found shape \(1, 16, 16\); expected \(1, 32, 32\)"):
        data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)


def test_empty_class_folder(tmp_path):
    root = make_deeplense_folder(tmp_path / "real")
    for f in (root / "train" / "vort").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"train/vort: empty class folder"):
        data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)


def test_missing_class_folder_lists_what_is_there(tmp_path):
    root = make_deeplense_folder(tmp_path / "real", names=("no", "sphere", "other"))
    with pytest.raises(DataError, match=r"no class 'vort' folder .*found no, other, sphere"):
        data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)


@pytest.mark.slow  # real interpreters
def test_data_cli_converts_a_real_folder_and_previews_it(tmp_path):
    root = make_deeplense_folder(tmp_path / "real", names=("no", "cdm", "axion"))
    result = run_cli("platform.data", "task=classification", f"data.path={root}", f"data.cache_dir={tmp_path}/cache",
                     cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "train: 9 images (1, 32, 32)  no=3, sphere=3, vort=3" in result.stdout
    preview = result.stdout.split("preview: ")[1].strip()
    assert os.path.getsize(preview) > 1000


def make_lens_finding_folder(root, per_class=(2, 5)):
    # Test II's layout: <split>_<class>/ side by side, (3, 64, 64) float32, few lenses.
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name, count in zip(("lenses", "nonlenses"), per_class):
            folder = root / f"{split}_{name}"
            folder.mkdir(parents=True)
            for i in range(count):
                np.save(folder / f"{name}_{i}.npy", rng.random((3, 64, 64)).astype(np.float32))
    return root


@pytest.mark.slow  # real interpreters
def test_data_cli_converts_a_lens_finding_folder(tmp_path):
    root = make_lens_finding_folder(tmp_path / "lenses")
    result = run_cli("platform.data", "task=classification", f"data.path={root}", "data.classes=[nonlenses,lenses]",
                     f"data.cache_dir={tmp_path}/cache", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "train: 7 images (3, 64, 64)  nonlenses=5, lenses=2" in result.stdout
    assert "val: 7 images (3, 64, 64)  nonlenses=5, lenses=2" in result.stdout  # test_* is the validation split
    images, columns = shards_lib.read(data.from_folder(str(root), ["nonlenses", "lenses"], str(tmp_path / "cache"), 4)["train"])
    first_lens = np.load(root / "train_lenses" / "lenses_0.npy")
    assert any(np.array_equal(image, first_lens) for image, label in zip(images, columns["label"]) if label == 1)


def test_npz_under_an_npy_name_is_refused(tmp_path):
    root = make_deeplense_folder(tmp_path / "real")
    with open(root / "train" / "no" / "0.npy", "wb") as f:
        np.savez(f, image=np.zeros((1, 32, 32)))
    with pytest.raises(DataError, match=r"train/no/0\.npy: an \.npz archive, not a \.npy array"):
        data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)


@pytest.mark.slow  # real interpreters
def test_data_cli_simulates(tmp_path):
    result = run_cli("platform.data", "task=classification", "data.preset=model_i", "data.num_train=6",
                     "data.num_val=3", f"data.cache_dir={tmp_path}/cache", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "train: 6 images (1, 150, 150)" in result.stdout and "val: 3 images (1, 150, 150)" in result.stdout


@pytest.mark.slow  # real interpreters
def test_data_cli_corrupt_file_is_one_line(tmp_path):
    root = make_deeplense_folder(tmp_path / "real")
    (root / "train" / "no" / "0.npy").write_text("not numpy")
    result = run_cli("platform.data", f"data.path={root}", f"data.cache_dir={tmp_path}/cache", cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "train/no/0.npy: not a readable .npy array" in result.stderr


def test_unknown_preset_is_a_clear_error(tmp_path):
    cfg = config.build("classification", [{"data.preset": "model_iv", "data.cache_dir": str(tmp_path)}])
    with pytest.raises(DataError, match="data.preset=model_iv is not a simulator preset; expected one of model_i, model_ii"):
        data.substructure(cfg)


def test_shards_on_a_storage_uri_are_written_reused_and_read(tmp_path):
    uri = f"file://{tmp_path}/bucket/split"
    images = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    written = shards_lib.write(uri, images, {"label": np.arange(10)}, {"seed": 1}, shard_size=4)
    assert written.files[0] == f"{uri}/part-00000.parquet" and len(written.files) == 3
    assert shards_lib.reuse(uri, {"seed": 1}) == written and shards_lib.reuse(uri, {"seed": 2}) is None
    (tmp_path / "bucket" / "split" / "part-00001.parquet").write_bytes(b"cut")
    assert shards_lib.reuse(uri, {"seed": 1}) is None  # a damaged part is not reused
    back, columns = shards_lib.read(shards_lib.write(uri, images, {"label": np.arange(10)}, {"seed": 1}, 4))
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(columns["label"], np.arange(10))


def test_a_storage_uri_without_shards_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"data.path=file://.*/nothing: no platform shards there"):
        data.from_folder(f"file://{tmp_path}/nothing", ["no", "sphere", "vort"], str(tmp_path / "cache"), 4)
