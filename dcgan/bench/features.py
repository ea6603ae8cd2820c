"""`dcgan bench features`: images/s of the feature extractors `dcgan eval` uses."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from tqdm import tqdm

from dcgan.bench.timing import clock, in_turns
from dcgan.machine import device_label


def time_extractors(
    device_name: str = "cpu",
    batch: int = 32,
    windows: int = 5,
    calls: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """uint8 32x32 grey images -> features, img/s of each extractor, timed in turns:
    the pinned TorchScript Inception (NCHW input, as loaded, and with a channels-last
    input), the eager BN-folded rebuild `dcgan eval` uses, and the domain classifier."""
    import warnings

    import torch.nn.functional as F

    from dcgan.data import load_images
    from dcgan.features import DomainExtractor, InceptionExtractor, inception_path
    from dcgan.machine import resolve_device

    device = resolve_device(device_name)
    images = torch.from_numpy(
        load_images("fashion-mnist", 32, 1, split="test", progress=False).images[:batch]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(inception_path()), map_location=device).eval()

    def scripted_step(fmt: torch.memory_format):
        def run() -> int:
            with torch.no_grad():
                x = images.to(device, torch.float32).expand(-1, 3, -1, -1)
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                scripted((x / 128.0 - 1.0).contiguous(memory_format=fmt))
            return batch

        return run

    eager, domain = (
        InceptionExtractor(device),
        DomainExtractor("fashion-mnist", 32, 1, device=device, progress=progress),
    )
    steps = {
        "inception-torchscript": scripted_step(torch.contiguous_format),
        "inception-torchscript-cl-input": scripted_step(torch.channels_last),
        "inception-eager-folded": lambda: len(eager.features(images)),
        "domain": lambda: len(domain.features(images)),
    }
    for step in steps.values():  # warm-up: oneDNN primitives, allocator
        step()
    bar = tqdm(total=windows, desc="extractors", unit="window", disable=not progress)
    wins = in_turns(steps, windows, calls, clock("wall", device), lambda: bar.update(1))
    bar.close()
    label = device_label(device)
    return [
        {
            "name": name,
            "device": label,
            "batch": batch,
            "img_per_s": statistics.median(n / s for n, s in w),
        }
        for name, w in wins.items()
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'extractor':<32} {'batch':>5} {'img/s':>8}   on {rows[0]['device']}"]
    lines += [f"{r['name']:<32} {r['batch']:>5} {r['img_per_s']:>8.1f}" for r in rows]
    return "\n".join(lines)
