"""Is the simulator's hardest preset learnable? ``classification`` on ``test1`` and ``lens_finding``
at 30,000 training images, on one GPU, with the platform's simulator, model and metrics.

    python -m benchmarks.gpu_learnability --task classification --train 30000 --epochs 20
    python -m benchmarks.gpu_learnability --task lens_finding --train 30000 --epochs 20

The recipe is the platform's: timm ResNet-18 (one input channel for the substructure images, three
bands for lens finding), AdamW at the task's default learning rate and weight decay 0.05, a cosine
schedule, gradient clipping at 1, bf16 autocast and channels_last on the GPU, the dihedral
augmentation (flips and quarter turns) for training; the lens finder's BCE weighted by the training
split's negatives per lens. Protocol: train, val and test drawn from their own seeds; the best
epoch and the finder's threshold chosen on val; test scored once, with the best epoch's weights,
at that threshold. It runs the loop in plain PyTorch, not through Ray Train and MLflow: the GPU
machines this project is lent hold no Ray or MLflow and cannot fetch them. Writes JSON to
``benchmarks/results/`` (or ``$OUT``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F


def simulated(task: str, n: int, seed: int, preset: str, positive_fraction: float):
    """(images (N, C, H, W) float32, labels (N,)) from the platform's simulator."""
    if task == "classification":
        from platform.data.simulate import simulate

        images, truth = simulate(preset, n, seed)
    else:
        from platform.data.lenses import simulate_lenses

        images, truth = simulate_lenses(n, positive_fraction, seed)
    return torch.from_numpy(images), torch.from_numpy(truth["label"].astype(np.int64))


def dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip and quarter turn for each image (B, C, H, W): the sky has no orientation."""
    turns = torch.randint(4, (len(images),), generator=generator, device="cpu")
    flips = torch.rand(len(images), generator=generator, device="cpu") < 0.5
    out = torch.empty_like(images)
    for k in range(4):
        for flip in (False, True):
            rows = ((turns == k) & (flips == flip)).nonzero().flatten().to(images.device)
            if len(rows):
                chosen = torch.rot90(images[rows], k, dims=(2, 3))
                out[rows] = chosen.flip(3) if flip else chosen
    return out


def scores(model, images: torch.Tensor, batch: int, device) -> np.ndarray:
    """The model's probabilities (N, K) (softmax) or (N,) (one logit: sigmoid) over ``images``."""
    model.eval()
    out = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(images), batch):
            x = images[start:start + batch].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            out.append((logits.softmax(1) if logits.shape[1] > 1 else torch.sigmoid(logits[:, 0])).cpu())
    return torch.cat(out).numpy()


def metrics(task: str, probs: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> dict:
    from platform.metrics import binary_metrics, classification_metrics

    if task == "classification":
        return classification_metrics(probs, labels, ["no", "sphere", "vort"])
    return binary_metrics(probs, labels, threshold)


def train(args, splits: dict, device, lr: float) -> dict:
    import timm

    task = args.task
    images, labels = (t.to(device) for t in splits["train"])  # on the GPU once: 2.7 GB at 30,000 150x150
    classes = 3 if task == "classification" else 1
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, in_chans=images.shape[1], num_classes=classes).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(images) / args.batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    pos_weight = (labels == 0).sum().float() / (labels == 1).sum().clamp(min=1)  # negatives per lens
    generator = torch.Generator().manual_seed(args.seed)
    objective = "auc_macro" if task == "classification" else "roc_auc"
    best, best_state, history, trained, train_seconds = -1.0, None, [], 0, 0.0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(images), args.batch):
            rows = order[start:start + args.batch].to(device)
            x = dihedral(images[rows], generator).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
            y = labels[rows]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x).float()
            loss = (F.cross_entropy(logits, y) if task == "classification" else
                    F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), pos_weight=pos_weight))
            if not torch.isfinite(loss):  # as the platform's loop does: a diverged run stops, saying where
                return {"lr": lr, "history": history, "diverged": f"loss {float(loss)} at epoch {epoch + 1}, "
                                                                  f"image {trained} of the epochs' stream"}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            trained += len(rows)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - started
        probs = scores(model, splits["val"][0], args.batch, device)
        if not np.isfinite(probs).all():
            return {"lr": lr, "history": history, "diverged": f"non-finite outputs after epoch {epoch + 1}"}
        val = metrics(task, probs, splits["val"][1].numpy())
        history.append({"epoch": epoch + 1, "loss": float(loss), **{f"val/{k}": v for k, v in val.items()}})
        print(json.dumps(history[-1]), flush=True)
        if math.isfinite(val[objective]) and val[objective] > best:  # the best epoch, chosen on val
            best, best_state, best_val = val[objective], copy.deepcopy(model.state_dict()), val
    model.load_state_dict(best_state)
    threshold = best_val.get("threshold") if task == "lens_finding" else None
    test = metrics(task, scores(model, splits["test"][0], args.batch, device), splits["test"][1].numpy(), threshold)
    return {"lr": lr, "history": history, "best_epoch": max(history, key=lambda h: h[f"val/{objective}"])["epoch"],
            "val": best_val, "test": test, "train_images_per_s": trained / train_seconds,
            "train_seconds": train_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["classification", "lens_finding"], default="classification")
    parser.add_argument("--preset", default="test1")
    parser.add_argument("--train", type=int, default=30000)
    parser.add_argument("--val", type=int, default=3000)
    parser.add_argument("--test", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3], help="one run per learning rate, same data")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    fractions = {"train": 1 / 17, "val": 1 / 101, "test": 1 / 101}  # the real Test II's imbalance
    splits = {split: simulated(args.task, n, 1000 * k + args.seed, args.preset, fractions[split])
              for k, (split, n) in enumerate((("train", args.train), ("val", args.val), ("test", args.test)))}
    simulated_seconds = time.perf_counter() - started
    assert all(bool(torch.isfinite(images).all()) for images, _ in splits.values()), "the simulator gave NaN"
    result = {"args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "simulate_seconds": simulated_seconds,
              "simulate_images_per_s": (args.train + args.val + args.test) / simulated_seconds,
              "runs": [train(args, splits, device, lr) for lr in args.lr], "wall_seconds": time.perf_counter() - started}
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"gpu_learnability_{args.task}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    for run in result["runs"]:
        print(json.dumps({k: v for k, v in run.items() if k != "history"}, default=float))


if __name__ == "__main__":
    main()
