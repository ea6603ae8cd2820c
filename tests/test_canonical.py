"""`dcgan import` and `dcgan.load` on checkpoints of the canonical PyTorch DCGAN example.

The example's generator is written out below with torch.nn, exactly as pytorch/examples'
dcgan/main.py builds it (nothing is imported from there), and its state_dict is saved as
that script saves `netG_epoch_24.pth`.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from torch import nn

import dcgan
from dcgan.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


class CanonicalG(nn.Module):
    """pytorch/examples dcgan/main.py's Generator (64x64), without its ngpu switch."""

    def __init__(self, nz: int, ngf: int, nc: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class CanonicalD(nn.Module):
    """The example's Discriminator: its file must be refused, not half-read."""

    def __init__(self, ndf: int, nc: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid(),
        )


def trained_looking(nz: int, ngf: int, nc: int, seed: int = 0) -> CanonicalG:
    """A canonical G with weights and BatchNorm statistics far from their initial values,
    so that eval mode (running statistics) is what the comparison exercises."""
    torch.manual_seed(seed)
    g = CanonicalG(nz, ngf, nc)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, nn.ConvTranspose2d):
                m.weight.normal_(0.0, 0.05)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(12_345)
    return g.eval()


def one_line(argv: list, capsys, match: str) -> None:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dcgan: error:") and err.count("\n") == 1, err
    assert match in err, err


def test_a_canonical_checkpoint_imports_samples_and_evaluates(tmp_path, capsys):
    canonical = trained_looking(nz=20, ngf=8, nc=3)
    pth = tmp_path / "netG_epoch_24.pth"
    torch.save(canonical.state_dict(), pth)  # what the example saves every epoch
    run = tmp_path / "imported"
    assert main(["import", str(pth), "--out", str(run)]) == 0, capsys.readouterr().err
    assert "nz 20, ngf 8, nc 3" in capsys.readouterr().out

    z = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))  # (6, nz)
    with torch.no_grad():
        want = canonical(z.view(6, 20, 1, 1))  # (6, 3, 64, 64)
        for g in (dcgan.load(run, device="cpu"), dcgan.load(pth, device="cpu")):
            assert g.meta["nz"] == 20 and g.meta["resolution"] == 64 and g.meta["nc"] == 3
            assert (g(z) - want).abs().max().item() <= 1e-5
    # a normal run folder: sample, export, report and eval read it like any other
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (2 * 66 + 2, 2 * 66 + 2) and im.mode == "RGB"
    assert (
        main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "g.pt")]) == 0
    )
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "netG_epoch_24.pth" in (tmp_path / "hf" / "README.md").read_text()
    result = dcgan.evaluate(run, "fake", metrics=("fid", "kid"), features="inception", n=10)
    assert result["resolution"] == 64 and result["channels"] == 3 and result["fid"] > 0
    # the folder refuses a second import over it
    one_line(["import", pth, "--out", run], capsys, "already")


def test_dataparallel_prefix_and_grey_images(tmp_path):
    canonical = trained_looking(nz=7, ngf=4, nc=1, seed=1)
    pth = tmp_path / "netG.pth"
    torch.save({f"module.{k}": v for k, v in canonical.state_dict().items()}, pth)
    g = dcgan.load(pth, device="cpu")
    z = g.z(5, seed=2)  # (5, 7)
    with torch.no_grad():
        assert (g(z) - canonical(z.view(5, 7, 1, 1))).abs().max().item() <= 1e-5
    assert g.sample(3).shape == (3, 1, 64, 64)


def test_wrong_files_are_one_line_and_a_hostile_pickle_runs_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    netd = tmp_path / "netD_epoch_24.pth"
    torch.save(CanonicalD(8, 3).state_dict(), netd)
    one_line(["import", netd, "--out", out], capsys, "discriminator")

    bad = trained_looking(nz=20, ngf=8, nc=3).state_dict()
    bad["main.3.weight"] = torch.zeros(64, 16, 4, 4)  # ngf * 8 -> ngf * 2, not ngf * 4
    torch.save(bad, tmp_path / "bad.pth")
    one_line(["import", tmp_path / "bad.pth", "--out", out], capsys, "main.3.weight")

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    one_line(["import", tmp_path / "tensor.pth", "--out", out], capsys, "state_dict")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "netG_epoch_24.pth"
    torch.save({"main.0.weight": Evil()}, evil, pickle_module=pickle)
    one_line(["import", evil, "--out", out], capsys, "weights_only")
    with pytest.raises(dcgan.UserError, match="weights_only"):
        dcgan.load(evil)
    assert not marker.exists() and not out.exists()
