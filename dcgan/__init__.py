"""dcgan: train, evaluate, benchmark and explain Deep Convolutional GANs on PyTorch.

The Python API is the handful of names in `__all__`; the command line calls the same
functions, so a run trained here is a run folder like any other:

>>> import dcgan
>>> run = dcgan.train("fmnist32", out="runs/fm", kimg=150)  # doctest: +SKIP
>>> G = dcgan.load(run.path)                                # doctest: +SKIP
>>> G.sample(64, seed=0).shape                              # doctest: +SKIP
torch.Size([64, 1, 32, 32])

`import dcgan` itself is light (no torch): each name is imported on first use, so the
command line starts fast.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from dcgan.errors import UserError

__version__ = "0.1.0"
__all__ = ["Generator", "Run", "UserError", "evaluate", "load", "save_grid", "train"]

if TYPE_CHECKING:  # what type checkers (py.typed) see; at run time __getattr__ below
    from dcgan.api import Generator, Run, evaluate, load, save_grid, train

_LAZY = ("Generator", "Run", "evaluate", "load", "save_grid", "train")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dcgan import api

        value = getattr(api, name)
        globals()[name] = value  # the module dict, not setattr: see _Package
        return value
    raise AttributeError(f"module 'dcgan' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package whose functions `train` and `evaluate` share their names with the
    submodules dcgan/train.py (the loop) and dcgan/evaluate.py. Importing a submodule
    sets the package attribute of its name to it; here the public function keeps the
    name. The submodules stay importable as ever (`from dcgan.train import ...`,
    `importlib.import_module("dcgan.train")`); only `import dcgan.train as m` now
    gives the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("train", "evaluate") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
