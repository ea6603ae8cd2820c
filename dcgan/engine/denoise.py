"""Seed 003's experiment: a small convolutional denoiser trained Noise2Noise-style,
with the engine and with torch autograd side by side.

Network (32x32 input; the sizes work out without any change to the seed's layers):
    Conv2d(3, 16, 4, s2, p1)    3 x 32 x 32 -> 16 x 16 x 16   (32 + 2 - 4) / 2 + 1 = 16
    ReLU
    Conv2d(16, 32, 4, s2, p0)  16 x 16 x 16 -> 32 x 7 x 7     (16 - 4) / 2 + 1 = 7
    ReLU
    ConvT(32, 16, 4, s2, p0)   32 x 7 x 7   -> 16 x 16 x 16   (7 - 1) * 2 + 4 = 16
    ReLU
    ConvT(16, 3, 4, s2, p1)    16 x 16 x 16 -> 3 x 32 x 32    (16 - 1) * 2 - 2 + 4 = 32
    Sigmoid

Data: the colour emoji at 32x32 in [0, 1]; 10% held out for validation. Each epoch
draws fresh Gaussian noise (std `sigma`) twice per training image: the network sees
clean + n1 and is trained by MSE towards clean + n2, never towards the clean image
(Noise2Noise: with zero-mean noise the expected target is the clean image). Validation
PSNR compares the output on fixed noisy validation inputs with the clean images.
SGD lr 0.5, momentum 0.9, batch 16, as in the seed. Both implementations start from
the same weights and see the same batches in the same order.

    python -m dcgan.engine.denoise --epochs 5 --device cpu
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from dcgan.engine.conv import Conv2d, ConvTranspose2d
from dcgan.engine.graph import backward, no_grad
from dcgan.engine.layers import ReLU, Sigmoid
from dcgan.engine.losses import MSELoss
from dcgan.engine.module import Module, Sequential
from dcgan.engine.optim import SGD
from dcgan.engine.reference import torch_denoiser


def build_denoiser(kernel: str | None = None) -> Sequential:
    return Sequential(
        Conv2d(3, 16, 4, stride=2, padding=1, kernel=kernel),
        ReLU(),
        Conv2d(16, 32, 4, stride=2, kernel=kernel),
        ReLU(),
        ConvTranspose2d(32, 16, 4, stride=2, kernel=kernel),
        ReLU(),
        ConvTranspose2d(16, 3, 4, stride=2, padding=1, kernel=kernel),
        Sigmoid(),
    )


def load_emoji(resolution: int = 32) -> torch.Tensor:
    """The emoji set from dcgan.data as float (N, 3, R, R) in [0, 1]."""
    from dcgan.data import load_images

    return to_unit(load_images("emoji", resolution, 3, progress=False).images)


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images are taken as already in [0, 1]."""
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


def psnr(pred: torch.Tensor, clean: torch.Tensor) -> float:
    """PSNR in dB over the whole set, for values in [0, 1]: 10 log10(1 / MSE)."""
    mse = ((pred - clean) ** 2).mean().item()
    return 10.0 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def _engine_epoch(net: Module, opt: SGD, loss: MSELoss, batches: list) -> None:
    net.train()
    for x, y in batches:
        backward(loss(net(x), y))
        opt.step()
        opt.zero_grad()


def _torch_epoch(net: torch.nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    net.train()
    for x, y in batches:
        out = net(x)
        loss = ((out - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_denoise(
    epochs: int = 5,
    device: str = "cpu",
    kernel: str = "native",
    *,
    images: np.ndarray | torch.Tensor | None = None,
    sigma: float = 0.2,
    batch: int = 16,
    lr: float = 0.5,
    momentum: float = 0.9,
    val_fraction: float = 0.1,
    max_train: int | None = None,
    seed: int = 0,
    with_torch: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Train the denoiser with the engine (and torch autograd) and report per epoch.

    Returns {"noisy_psnr": dB of the noisy validation inputs, "n_train", "n_val",
    "engine": {"psnr": [...], "sec_per_epoch": [...]}, "torch": {... same ...}}.
    `images` replaces the emoji set (uint8, or float in [0, 1], shape (N, 3, 32, 32)).
    """
    clean = to_unit(images) if images is not None else load_emoji(32)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(clean.shape[0], generator=gen)
    n_val = max(1, int(round(val_fraction * clean.shape[0])))
    val_clean = clean[order[:n_val]].to(device)
    train_clean = clean[order[n_val:]]
    if max_train is not None:
        train_clean = train_clean[:max_train]
    train_clean = train_clean.to(device)
    n_train = train_clean.shape[0]
    val_noisy = val_clean + sigma * torch.randn(val_clean.shape, generator=gen).to(device)

    torch.manual_seed(seed)
    net = build_denoiser(kernel).to(device)
    opt = SGD(net.parameters(), lr, momentum)
    mse = MSELoss()
    ref = torch_denoiser().to(device)
    ref.load_state_dict(net.state_dict())  # same initial weights
    ref_opt = torch.optim.SGD(ref.parameters(), lr, momentum)

    result: dict = {
        "noisy_psnr": psnr(val_noisy, val_clean),
        "n_train": n_train,
        "n_val": n_val,
        "sigma": sigma,
        "kernel": kernel,
        "engine": {"psnr": [], "sec_per_epoch": []},
        "torch": {"psnr": [], "sec_per_epoch": []},
    }
    if log:
        log(
            f"denoiser: {n_train} train / {n_val} val images, noise std {sigma}, kernel "
            f"{kernel}; noisy validation PSNR {result['noisy_psnr']:.2f} dB"
        )
        log("epoch  engine PSNR  torch PSNR  engine s/epoch  torch s/epoch")
    for epoch in range(1, epochs + 1):
        # the epoch's batches are fixed up front, so both implementations see the same
        # (input, target) pairs in the same order: input = clean + n1, target = clean + n2
        perm = torch.randperm(n_train, generator=gen)
        noise = sigma * torch.randn((2, *train_clean.shape), generator=gen).to(device)
        batches = []
        for i in range(0, n_train, batch):
            idx = perm[i : i + batch].to(device)
            x0 = train_clean[idx]
            batches.append((x0 + noise[0, idx], x0 + noise[1, idx]))

        t0 = time.perf_counter()
        _engine_epoch(net, opt, mse, batches)
        result["engine"]["sec_per_epoch"].append(time.perf_counter() - t0)
        net.eval()
        with no_grad():
            result["engine"]["psnr"].append(psnr(net(val_noisy), val_clean))

        if with_torch:
            t0 = time.perf_counter()
            _torch_epoch(ref, ref_opt, batches)
            result["torch"]["sec_per_epoch"].append(time.perf_counter() - t0)
            ref.eval()
            with torch.no_grad():
                result["torch"]["psnr"].append(psnr(ref(val_noisy), val_clean))
        if log:
            e, t = result["engine"], result["torch"]
            tp = f"{t['psnr'][-1]:11.2f}" if with_torch else f"{'-':>11s}"
            ts = f"{t['sec_per_epoch'][-1]:14.2f}" if with_torch else f"{'-':>14s}"
            log(f"{epoch:5d}  {e['psnr'][-1]:11.2f} {tp}  {e['sec_per_epoch'][-1]:14.2f} {ts}")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Noise2Noise denoiser: engine vs torch autograd")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernel", choices=["native", "unfold"], default="native")
    ap.add_argument("--sigma", type=float, default=0.2, help="Gaussian noise std ([0, 1] images)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run_denoise(args.epochs, args.device, args.kernel, sigma=args.sigma, seed=args.seed)


if __name__ == "__main__":
    main()
