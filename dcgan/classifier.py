"""The domain classifier: a small CNN trained on a labelled source, and its cache.

`dcgan.features.DomainExtractor` reads its 128-d penultimate layer (a fast FID on
the CPU) and its softmax (the "classifier score"). The network is trained once
per (source, resolution, channels) on the source's train split, tested on its
test split, and cached under `cache_root()` with that test accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dcgan import atomic, checkpoint
from dcgan.errors import UserError
from dcgan.pixels import from_uint8

CLASSIFIER_VERSION = 1  # bump when the architecture or training recipe changes
CLASSIFIER_INPUT = 32  # the network always sees 32x32: the sources are 28x28 at heart
CLASSIFIER_DIM = 128


class DomainNet(nn.Module):
    """(B, C, R, R) in [-1, 1] -> (features (B, 128), logits (B, 10)).

    Three strided 4x4 convolutions (as in the DCGAN discriminator) rather than
    3x3 convolutions plus max-pooling: half the multiply-adds, and CPU max-pool
    with indices was the slowest op of the pooled variant here. Inputs larger
    than 32x32 are average-pooled down to 32x32 first (an exact 2x2 / 4x4 block
    mean at 64 / 128 px), so the cost does not grow with the resolution while
    the classifier still sees the images as the GAN renders them.
    """

    def __init__(self, nc: int, classes: int = 10, width: int = 16):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]

        # (nc) x 32 x 32 -> (w) x 16 x 16 -> (2w) x 8 x 8 -> (4w) x 4 x 4
        self.conv = nn.Sequential(*block(nc, w), *block(w, 2 * w), *block(2 * w, 4 * w))
        self.fc = nn.Linear(4 * w * 16, CLASSIFIER_DIM)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(CLASSIFIER_DIM, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != CLASSIFIER_INPUT:
            if x.shape[-1] % CLASSIFIER_INPUT == 0:
                x = F.adaptive_avg_pool2d(x, CLASSIFIER_INPUT)
            else:
                x = F.interpolate(x, size=(CLASSIFIER_INPUT, CLASSIFIER_INPUT),
                                  mode="bilinear", align_corners=False, antialias=True)
        h = F.relu(self.fc(self.conv(x).flatten(1)))  # (B, 128) penultimate features
        return h, self.head(self.drop(h))


def classifier_paths(source: str, resolution: int, channels: int,
                     cache_dir: str | Path = "") -> tuple[Path, Path]:
    from dcgan.data import cache_root

    stem = f"classifier-{source}-{resolution}px-{channels}ch"
    root = cache_root(str(cache_dir))
    return root / f"{stem}.safetensors", root / f"{stem}.json"


def train_classifier(source: str, resolution: int, channels: int, cache_dir: str | Path = "",
                     epochs: float = 2.0, batch: int = 128, seed: int = 0,
                     progress: bool = True) -> dict[str, Any]:
    """Train the domain classifier on `source`'s train split, test it, cache both files.

    Returns the record written beside the weights (test accuracy, training time, ...).
    """
    from dcgan.data import load_images

    train = load_images(source, resolution, channels, split="train", cache_dir=str(cache_dir),
                        progress=progress)
    test = load_images(source, resolution, channels, split="test", cache_dir=str(cache_dir),
                       progress=progress)
    if train.labels is None or test.labels is None:
        raise UserError(f"{source} has no labels: the domain classifier needs fashion-mnist "
                        f"or mnist")
    nc = train.images.shape[1]
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    torch.manual_seed(seed)
    net = DomainNet(nc, classes)
    x_train = torch.from_numpy(train.images)
    y_train = torch.from_numpy(train.labels.astype(np.int64))
    n = x_train.shape[0]
    steps = max(1, int(epochs * n / batch))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    # One-cycle: a short warm-up then annealing gets a small net to its plateau in ~2 epochs.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    step = 0
    with tqdm(total=steps, desc=f"classifier {source} {resolution}px", disable=not progress,
              leave=False) as bar:
        while step < steps:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - batch + 1, batch):
                if step == steps:
                    break
                idx = perm[i:i + batch]
                _, logits = net(from_uint8(x_train[idx]))
                loss = F.cross_entropy(logits, y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
    train_seconds = time.perf_counter() - t0
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, test.images.shape[0], 1000):
            _, logits = net(from_uint8(torch.from_numpy(test.images[i:i + 1000])))
            correct += int((logits.argmax(1).numpy() == test.labels[i:i + 1000]).sum())
    record = {
        "source": source, "resolution": resolution, "channels": nc, "classes": classes,
        "version": CLASSIFIER_VERSION, "test_accuracy": correct / test.images.shape[0],
        "n_train": int(n), "n_test": int(test.images.shape[0]), "epochs": epochs,
        "train_seconds": round(train_seconds, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    weights, meta = classifier_paths(source, resolution, channels, cache_dir)
    checkpoint.save_state_dict(net, weights)
    atomic.write_text(meta, json.dumps(record, indent=2) + "\n")
    return record
