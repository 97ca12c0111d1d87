"""Datasets: simulated shards reused by manifest, real DeepLense folders read strictly, the data CLI."""

import os
import re

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


def flip_bytes(path: str) -> None:
    """Damage a file as a failing disk or a stray write would: bytes changed, its size kept."""
    content = bytearray(open(path, "rb").read())
    middle = len(content) // 2
    content[middle:middle + 16] = bytes(b ^ 0xFF for b in content[middle:middle + 16])
    with open(path, "wb") as f:
        f.write(content)


def test_a_cached_shard_with_flipped_bytes_is_found_by_its_hash_and_rebuilt(tmp_path, capsys):
    first = data.simulated("model_ii", 9, seed=0, root=str(tmp_path), shard_size=4)
    images, columns = shards_lib.read(first)
    flip_bytes(first.files[1])
    assert os.path.getsize(first.files[1]) == first.manifest["files"][1]["bytes"]  # a size check sees nothing
    again = data.simulated("model_ii", 9, seed=0, root=str(tmp_path), shard_size=4)
    assert capsys.readouterr().err.strip() == (f"cached data at {first.path} is corrupted (part-00001.parquet: content "
                                              f"hash differs); rebuilding it")
    back, back_columns = shards_lib.read(again)
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(back_columns["label"], columns["label"])
    assert again.manifest["content_hash"] == first.manifest["content_hash"]
    mtime = os.path.getmtime(again.files[1])
    data.simulated("model_ii", 9, seed=0, root=str(tmp_path), shard_size=4)  # intact now: reused, nothing said
    assert capsys.readouterr().err == "" and os.path.getmtime(again.files[1]) == mtime


def test_a_converted_folder_with_a_corrupted_shard_is_converted_again(tmp_path, capsys):
    root = make_deeplense_folder(tmp_path / "real")
    convert = lambda: data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)  # noqa: E731
    first = convert()
    flip_bytes(first["test"].files[0])
    again = convert()
    assert f"cached data at {first['test'].path} is corrupted (part-00000.parquet: content hash differs); " \
           f"rebuilding it" in capsys.readouterr().err
    images, columns = shards_lib.read(again["test"])
    for image, name in zip(images, columns["file"]):  # every row is its file's pixels again
        np.testing.assert_array_equal(image, np.load(root / name).astype(np.float32))


def split_files(splits) -> dict[str, set]:
    return {split: set(shards_lib.read(s)[1]["file"]) for split, s in splits.items()}


def test_real_folder_with_aliases_and_2d_files(tmp_path):
    root = make_deeplense_folder(tmp_path / "real", shape=(32, 32), names=("no_substructure", "subhalo", "vortex"))
    splits = data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)
    # The release's held-out val/ is the test split; validation is carved from train/, one per class here.
    assert (splits["train"].num_rows, splits["val"].num_rows, splits["test"].num_rows) == (6, 3, 9)
    assert splits["train"].image_shape == (1, 32, 32) and splits["train"].manifest["counts"] == [2, 2, 2]
    assert splits["val"].manifest["counts"] == [1, 1, 1] and splits["test"].manifest["counts"] == [3, 3, 3]
    files = split_files(splits)
    assert all(f.startswith("train/") for f in files["train"] | files["val"]) and not files["train"] & files["val"]
    assert files["test"] == {f"val/{c}/{i}.npy" for c in ("no_substructure", "subhalo", "vortex") for i in range(3)}
    images, columns = shards_lib.read(splits["test"])
    original = np.load(root / "val" / "subhalo" / "0.npy")
    assert np.allclose(images[list(columns["file"]).index("val/subhalo/0.npy"), 0], original, atol=1e-7)


def test_validation_is_carved_by_class_and_seed(tmp_path):
    root = make_deeplense_folder(tmp_path / "real", per_class=20)
    carve = lambda fraction, seed: split_files(data.from_folder(  # noqa: E731
        str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), 4, val_fraction=fraction, seed=seed))
    first = carve(0.25, 0)
    assert len(first["val"]) == 15 and len(first["train"]) == 45  # 5 of each class's 20
    assert {f.split("/")[1] for f in first["val"]} == {"no", "sphere", "vort"}
    assert carve(0.25, 0) == first and carve(0.25, 1)["val"] != first["val"]  # seeded: the same split again


def test_a_folder_with_all_three_splits_is_used_as_it_is(tmp_path):
    root = make_deeplense_folder(tmp_path / "real", splits=("train", "val", "test"))
    files = split_files(data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), 4))
    assert {split: {f.split("/")[0] for f in names} for split, names in files.items()} == {
        "train": {"train"}, "val": {"val"}, "test": {"test"}}


def test_a_folder_without_a_held_out_split_is_refused(tmp_path):
    root = make_deeplense_folder(tmp_path / "real", splits=("train",))
    with pytest.raises(DataError, match="only a training split .* a held-out split is needed for the test numbers"):
        data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), 4)


@pytest.mark.parametrize("content, found", [
    (np.full((1, 32, 32), np.nan), r"found 1024 NaN and 0 infinite pixels; every pixel must be a finite number"),
    (np.where(np.eye(32)[None] > 0, np.inf, 0.5), r"found 0 NaN and 32 infinite pixels"),
    (np.full((1, 32, 32), 0.25), r"every pixel is 0.25, a blank image"),
    (np.linspace(0, 255, 1024).reshape(1, 32, 32), r"pixels from 0 to 255, far outside this layout's range \[0, 1\]"),
    (np.arange(1024, dtype=np.int64).reshape(1, 32, 32), r"found dtype int64; expected floating-point pixels"),
    (np.ones((1, 32, 32), dtype=np.complex64), r"found dtype complex64; expected floating-point pixels"),
])
def test_a_file_that_cannot_be_trusted_is_named_before_any_work(tmp_path, content, found):
    root = make_deeplense_folder(tmp_path / "real")
    np.save(root / "val" / "sphere" / "1.npy", content)
    with pytest.raises(DataError, match=r"val/sphere/1\.npy: " + found):
        data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), shard_size=4)
    assert not (tmp_path / "cache" / "folders").exists() or not any((tmp_path / "cache" / "folders").rglob("*.parquet"))


def test_images_shared_between_train_and_test_are_counted(tmp_path, capsys):
    root = make_deeplense_folder(tmp_path / "real", per_class=4)
    for i in (0, 1):
        (root / "val" / "no" / f"{i}.npy").write_bytes((root / "train" / "no" / f"{i}.npy").read_bytes())
    data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), 4)
    warnings = re.findall(r"warning: (\d+) image\(s\) of the test split are also in the (train|val) split",
                          capsys.readouterr().err)
    assert sum(int(n) for n, _ in warnings) == 2, warnings  # in train, or in the val carved from it
    data.from_folder(str(root), ["no", "sphere", "vort"], str(tmp_path / "cache"), 4)  # converted once, said each time
    assert "of the test split are also in the" in capsys.readouterr().err


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
    np.save(root / "train" / "sphere" / "2.npy", np.random.default_rng(0).random((1, 16, 16)))
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
    assert "train: 6 images (1, 32, 32)  no=2, sphere=2, vort=2" in result.stdout
    assert " test: 9 images (1, 32, 32)  no=3, sphere=3, vort=3" in result.stdout
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
    assert "train: 5 images (3, 64, 64)  nonlenses=4, lenses=1" in result.stdout
    assert "  val: 2 images (3, 64, 64)  nonlenses=1, lenses=1" in result.stdout  # carved from train_*
    assert " test: 7 images (3, 64, 64)  nonlenses=5, lenses=2" in result.stdout  # test_* is the test split
    splits = data.from_folder(str(root), ["nonlenses", "lenses"], str(tmp_path / "cache"), 4)
    first_lens = np.load(root / "train_lenses" / "lenses_0.npy")
    (images, columns), = [read for read in (shards_lib.read(splits[s]) for s in ("train", "val"))
                          if "train_lenses/lenses_0.npy" in list(read[1]["file"])]  # in train, or carved into val
    row = list(columns["file"]).index("train_lenses/lenses_0.npy")
    assert np.array_equal(images[row], first_lens) and columns["label"][row] == 1


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
    assert "test: 3 images (1, 150, 150)" in result.stdout  # data.num_test: as num_val


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
