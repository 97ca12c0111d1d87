"""Data throughput: Parquet shards through Ray Data into a Train worker, against what the model consumes.

    python -m benchmarks.data_throughput [--images 2048] [--preset model_i] [--epochs 3] [--batch-size 64]

In one Ray Train worker (one CPU, as ``platform.train`` runs it), over the same simulated
shards (``model_i``: 150x150, 25 subhaloes):

- streamed: the loop's own loader for a split larger than ``data.in_memory_mb``: Ray Data reads
  the Parquet files every epoch, a local shuffle buffer, then ``collate`` with augmentation into
  (B, 1, H, W) tensors; the first epoch includes starting the pipeline;
- in memory: the loader for a split that fits: read once into Ray's object store by the driver,
  sliced from the node's shared copy by the worker, a fresh permutation each epoch;
- consumed: ``classification``'s training step (ResNet-18 forward, backward, AdamW) on those
  batches, images/s, in the same worker.

The loader must deliver at least 3 times what the model consumes, so it is never what a run
waits for. Medians over epochs (and over step blocks for the model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import ROOT, median, save, table

TASK = "classification"


def worker_loop(config: dict) -> None:
    import torch

    from platform import config as config_lib, registry
    from platform.loop import ray_train_session, worker_batches

    task = registry.get(TASK)
    cfg = config_lib.from_dict(config["cfg"])
    session = ray_train_session()
    rates: dict[str, list[float]] = {"streamed": [], "in_memory": []}
    for kind, in_memory in (("streamed", {}), ("in_memory", config["refs"])):
        started = time.perf_counter()  # the first epoch includes setting the loader up
        batches = worker_batches("train", {**config, "in_memory": in_memory}, cfg, session)
        for epoch in range(config["epochs"]):
            images = 0
            for numpy_batch in batches(epoch):
                images += len(task.collate(numpy_batch, cfg, True)["image"])
            rates[kind].append(images / (time.perf_counter() - started))
            started = time.perf_counter()
    model = task.build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    batch = task.collate(next(iter(worker_batches("val", {**config, "in_memory": config["refs"]}, cfg, session)(None))),
                         cfg, True)
    consumed = []
    for block in range(4):  # the first block warms up
        started = time.perf_counter()
        for _ in range(config["steps"]):
            loss = task.train_step(model, batch, cfg)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if block:
            consumed.append(config["steps"] * len(batch["image"]) / (time.perf_counter() - started))
    with open(config["report"], "w") as f:  # the worker shares this machine with the driver
        json.dump({"streamed": rates["streamed"], "in_memory": rates["in_memory"], "consumed": consumed,
                   "threads": torch.get_num_threads()}, f)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--preset", default="model_i")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed block of the model")
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "results", "cache"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "data_throughput.json"))
    args = parser.parse_args(argv)

    import tempfile

    import ray
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from platform import cluster, config as config_lib, registry
    from platform.runner import put_in_memory

    cfg = config_lib.build(TASK, [{"data.preset": args.preset, "data.num_train": args.images,
                                   "data.num_val": args.batch_size, "data.cache_dir": args.cache,
                                   "train.batch_size": args.batch_size}])
    shards = registry.get(TASK).build_data(cfg)
    cluster.connect("")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="bench-data-") as storage:
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"cfg": config_lib.to_dict(cfg), "epochs": args.epochs, "steps": args.steps,
                               "train_rows": args.images, "report": os.path.join(storage, "rates.json"),
                               "refs": put_in_memory(cfg, shards)},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="data-throughput", storage_path=storage),
            datasets={"train": ray.data.read_parquet(shards["train"].files)},
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        with open(os.path.join(storage, "rates.json")) as f:
            metrics = json.load(f)
    ray.shutdown()

    h = shards["train"].image_shape[-1]
    summary = {
        "size": f"{h}x{h}",
        "streamed_first_epoch_images_per_s": metrics["streamed"][0],
        "streamed_images_per_s": median(metrics["streamed"][1:] or metrics["streamed"]),
        "in_memory_first_epoch_images_per_s": metrics["in_memory"][0],
        "in_memory_images_per_s": median(metrics["in_memory"][1:] or metrics["in_memory"]),
        "consumed_images_per_s": median(metrics["consumed"]),
        "threads": metrics["threads"],
    }
    summary["streamed_over_consumed"] = summary["streamed_images_per_s"] / summary["consumed_images_per_s"]
    summary["in_memory_over_consumed"] = summary["in_memory_images_per_s"] / summary["consumed_images_per_s"]
    print(table(["into one worker", "first epoch images/s", "steady images/s", "x model's rate"], [
        ["Ray Data, streamed", summary["streamed_first_epoch_images_per_s"], summary["streamed_images_per_s"],
         summary["streamed_over_consumed"]],
        ["Ray Data, in memory", summary["in_memory_first_epoch_images_per_s"], summary["in_memory_images_per_s"],
         summary["in_memory_over_consumed"]],
        ["ResNet-18 training step", "", summary["consumed_images_per_s"], 1.0],
    ]))
    print(f"\n{summary['size']} images, batch {args.batch_size}, {summary['threads']} torch thread(s); "
          f"target: the loader at least 3x the model's rate")
    result = {"benchmark": "data_throughput",
              "command": "python -m benchmarks.data_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(args), "summary": summary, "per_epoch": metrics}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
