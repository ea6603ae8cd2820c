"""The domain classifier: a small CNN trained on a labelled source, and its cache.

`dcgan.features.DomainExtractor` reads its 128-d penultimate layer (a fast FID on
the CPU) and its softmax (the "classifier score"). The network is trained once
per (source, resolution, channels) on the source's train split, tested on its
test split, and cached under `cache_root()` with that test accuracy: the weights
and a JSON record that holds the `ClassifierKey` (the content digests of both
splits among its fields) and the weights' SHA-256, both checked before use.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dcgan import atomic, checkpoint
from dcgan.cache_key import CacheKey, safe_name
from dcgan.content import sha256_file
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
            return [
                nn.Conv2d(cin, cout, 4, 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

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
                x = F.interpolate(
                    x,
                    size=(CLASSIFIER_INPUT, CLASSIFIER_INPUT),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
        h = F.relu(self.fc(self.conv(x).flatten(1)))  # (B, 128) penultimate features
        return h, self.head(self.drop(h))


@dataclass(frozen=True)
class ClassifierKey(CacheKey):
    """Everything that determines a cached classifier (and its recorded test accuracy)."""

    kind: ClassVar[str] = "classifier"
    source: str
    train: str  # the train split's slug: its name and a digest of its files' bytes
    test: str  # the test split's: the recorded accuracy is measured on it
    resolution: int
    channels: int  # as asked: 0 is the source's own
    version: int = CLASSIFIER_VERSION

    def readable(self) -> tuple[str, str]:
        return (
            f"classifier-{safe_name(Path(self.source).name or 'source')}",
            f"-{self.resolution}px-{self.channels}ch",
        )


def _key_and_files(
    source: str, resolution: int, channels: int, cache_dir: str | Path
) -> tuple[ClassifierKey, Path, Path]:
    from dcgan import sources
    from dcgan.data import cache_root

    root = cache_root(str(cache_dir))
    train, test = (sources.resolve(source, split, root).slug for split in sources.SPLITS)
    key = ClassifierKey(source, train, test, resolution, channels)
    return key, root / key.filename(".safetensors"), root / key.filename(".json")


def _problem(key: ClassifierKey, weights: Path, meta: Path) -> str:
    """Why the cached pair cannot be used as it is, or "" when it can."""
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return "unreadable record"
    if not isinstance(record, dict) or not key.matches(record.get("key")):
        return "stored key differs"  # another key's files, or written before keys were stored
    try:
        if record.get("weights_sha256") != sha256_file(weights):
            return "weights differ from their record"
    except OSError:
        return "unreadable weights"
    return ""


def classifier_paths(
    source: str, resolution: int, channels: int, cache_dir: str | Path = ""
) -> tuple[Path, Path]:
    """(weights, record) of the classifier cached for these arguments.

    A pair that is there but not this key's whole and unchanged files is removed
    first, with a warning, like a damaged file: a caller that finds both files may
    trust them, and one that does not trains again.
    """
    key, weights, meta = _key_and_files(source, resolution, channels, cache_dir)
    if weights.is_file() and meta.is_file() and (problem := _problem(key, weights, meta)):
        print(
            f"warning: the cached classifier {weights} is damaged ({problem}); training it again",
            file=sys.stderr,
        )
        weights.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    return weights, meta


def train_classifier(
    source: str,
    resolution: int,
    channels: int,
    cache_dir: str | Path = "",
    epochs: float = 2.0,
    batch: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the domain classifier on `source`'s train split, test it, cache both files.

    Returns the record written beside the weights (test accuracy, training time, ...).
    """
    from dcgan.data import load_images

    # The key of the files as they are before training: a change meanwhile retrains next time.
    key, weights, meta = _key_and_files(source, resolution, channels, cache_dir)
    train = load_images(
        source, resolution, channels, split="train", cache_dir=str(cache_dir), progress=progress
    )
    test = load_images(
        source, resolution, channels, split="test", cache_dir=str(cache_dir), progress=progress
    )
    if train.labels is None or test.labels is None:
        raise UserError(
            f"{source} has no labels: the domain classifier needs fashion-mnist or mnist"
        )
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
    with tqdm(
        total=steps, desc=f"classifier {source} {resolution}px", disable=not progress, leave=False
    ) as bar:
        while step < steps:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - batch + 1, batch):
                if step == steps:
                    break
                idx = perm[i : i + batch]
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
            _, logits = net(from_uint8(torch.from_numpy(test.images[i : i + 1000])))
            correct += int((logits.argmax(1).numpy() == test.labels[i : i + 1000]).sum())
    record = {
        "source": source,
        "resolution": resolution,
        "channels": nc,
        "classes": classes,
        "version": CLASSIFIER_VERSION,
        "test_accuracy": correct / test.images.shape[0],
        "n_train": int(n),
        "n_test": int(test.images.shape[0]),
        "epochs": epochs,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    checkpoint.save_state_dict(net, weights)
    # The weights first, then the record naming their digest: a reader that finds a
    # record finds the weights it describes (or a mismatch, and trains again).
    record.update(key=key.as_dict(), weights_sha256=sha256_file(weights))
    atomic.write_text(meta, json.dumps(record, indent=2) + "\n")
    return record
