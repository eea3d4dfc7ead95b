"""Train the tiny Fashion-MNIST ViT that `builtin:fashion-vit` ships with.

The model is a real HF `ViTForImageClassification` (with a [CLS] token) from a tiny config, so the
token-pruning passes see a trained attention pattern rather than random weights. Data come from the
Debian package `dataset-fashion-mnist` (IDX files under /usr/share/datasets/fashion-mnist); the
script writes, under elision/models/builtin/fashion-vit/:

  config.json          the ViTConfig
  preprocessor_config.json  how raw images become pixel_values (size, the normalisation below)
  model.safetensors    the trained weights (float32)
  test_sample.safetensors  500 normalised test images + labels, so tests never need the dataset
  train_log.json       epochs, wall time and test accuracy on the full 10k test set

Usage: .venv/bin/python tools/train_fashion_vit.py [--epochs 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import gzip
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = Path(__file__).resolve().parents[1] / "elision" / "models" / "builtin" / "fashion-vit"
# Fashion-MNIST pixel statistics (of x/255) used to normalise inputs.
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (the MNIST container format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    _zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    img_path = DATA_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not img_path.exists():
        raise SystemExit(
            f"error: {img_path} not found; install it with "
            "`apt-get update && apt-get install -y dataset-fashion-mnist`"
        )
    images = read_idx(img_path)
    labels = read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def vit_config():
    from transformers import ViTConfig

    # 28x28 images, 4x4 patches -> 7x7 = 49 patch tokens + [CLS].
    return ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label={i: n for i, n in enumerate(CLASS_NAMES)},
        label2id={n: i for i, n in enumerate(CLASS_NAMES)},
    )


CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(pixel_values=x[i : i + batch]).logits.argmax(-1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from rich.progress import Progress
    from safetensors.torch import save_file
    from transformers import ViTForImageClassification

    torch.set_num_threads(min(args.threads, 2))
    torch.manual_seed(args.seed)
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    config = vit_config()
    config._attn_implementation = "sdpa"
    model = ViTForImageClassification(config)

    steps_per_epoch = (len(x_train) + args.batch - 1) // args.batch
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    t0 = time.time()
    with Progress() as progress:
        task = progress.add_task("training fashion-vit", total=total)
        for epoch in range(args.epochs):
            model.train()
            perm = torch.randperm(len(x_train))
            for s in range(steps_per_epoch):
                idx = perm[s * args.batch : (s + 1) * args.batch]
                xb = x_train[idx]
                # cheap augmentation: random horizontal flip (Fashion-MNIST classes are flip-invariant)
                flip = torch.rand(len(xb)) < 0.5
                xb[flip] = xb[flip].flip(-1)
                loss = torch.nn.functional.cross_entropy(model(pixel_values=xb).logits, y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                progress.update(task, advance=1, description=f"epoch {epoch + 1} loss {loss.item():.3f}")
                if not progress.console.is_terminal and s % 50 == 0:  # visible progress in logs too
                    print(f"epoch {epoch + 1} step {s}/{steps_per_epoch} loss {loss.item():.3f} "
                          f"{time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    acc = accuracy(model, x_test, y_test)
    print(f"test accuracy {acc:.4f} after {args.epochs} epochs ({train_s:.0f} s)")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    config.to_json_file(OUT_DIR / "config.json")
    (OUT_DIR / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 28, "width": 28},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [MEAN], "image_std": [STD]},
        indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, OUT_DIR / "model.safetensors")
    # A fixed, class-balanced-enough sample of the test set: the first 500 images.
    save_file({"pixel_values": x_test[:500].contiguous(), "labels": y_test[:500].contiguous()},
              OUT_DIR / "test_sample.safetensors")
    (OUT_DIR / "train_log.json").write_text(json.dumps({
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "train_seconds": round(train_s, 1), "test_accuracy_10k": acc,
        "test_accuracy_sample500": accuracy(model, x_test[:500], y_test[:500]),
    }, indent=2))


if __name__ == "__main__":
    main()
