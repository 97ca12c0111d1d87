"""What each run saw and ran on, as MLflow's own client reads it: its data as MLflow datasets (source,
the shards' content hash, schema, split and size) and MLflow's system metrics of the machine."""

import json

import pytest
from mlflow.tracking import MlflowClient

from platform import tracking
from platform.data import shards as shards_lib
from tests.helpers import run_cli, tiny

MAE = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1"]


@pytest.mark.slow
def test_a_run_records_its_datasets_and_the_machine_it_ran_on(tmp_path):
    db = tmp_path / "mlflow.db"
    result = run_cli("platform.train", "task=mae", "train.epochs=3", "train.name=recorded", "mlflow.system_metrics_s=0.5",
                     "data.num_test=20", *MAE, *tiny(tmp_path / "cache", db), cwd=str(tmp_path))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("deeplense-mae").experiment_id])

    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    for split, rows in (("train", 48), ("val", 30), ("test", 20)):
        (folder,) = (tmp_path / "cache").glob(f"**/{inputs[split].name}")  # the shards it names
        manifest = json.loads((folder / shards_lib.MANIFEST).read_text())
        assert inputs[split].digest == manifest["content_hash"][:32]
        assert json.loads(inputs[split].profile) == {"num_rows": rows, "image_shape": manifest["image_shape"]}
        assert json.loads(inputs[split].source)["uri"].endswith(inputs[split].name)
        columns = {c["name"]: c["type"] for c in json.loads(inputs[split].schema)["mlflow_colspec"]}
        assert columns["image"] == "binary" and columns["label"] in ("integer", "long"), columns
    # The machine, sampled while it trained (no GPU here: CPU and memory).
    sampled = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert sampled and all(0 <= m.value <= 100 for m in sampled)
    assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_a_run_samples_only_the_gpus_it_was_given():
    # NVML numbers every GPU of the machine; CUDA_VISIBLE_DEVICES names the run's, by index or UUID,
    # and CUDA's device 0 is the first it names.
    ids = [(0, "GPU-aaaa-0"), (1, "GPU-bbbb-1"), (2, "GPU-cccc-2"), (3, "GPU-dddd-3")]
    assert tracking.given_gpus(ids, "2,0") == [2, 0]
    assert tracking.given_gpus(ids, "GPU-dddd-3") == [3]
    assert tracking.given_gpus(ids, "GPU-bbbb") == [1]  # a UUID prefix, as CUDA takes it
    assert tracking.given_gpus(ids, "1,7,2") == [1]  # CUDA stops at the first it cannot use
    assert tracking.given_gpus(ids, "") == []
