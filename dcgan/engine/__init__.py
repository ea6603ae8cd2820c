"""A small neural-network engine with hand-written backward passes (no autograd).

See the README section "The engine". Modules keep what backward needs on a per-module stack: each
backward pops the entry of the most recent forward (dcgan.engine.module explains the
rule); `engine.no_grad()` runs forwards that will not be back-propagated.
"""

from dcgan.engine.conv import (
    KERNELS,
    Conv2d,
    ConvTranspose2d,
    fold,
    get_conv_kernel,
    set_conv_kernel,
    unfold,
)
from dcgan.engine.layers import BatchNorm2d, Dropout, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from dcgan.engine.losses import BCEWithLogitsLoss, MSELoss
from dcgan.engine.models import (
    EngineDiscriminator,
    EngineGenerator,
    build_discriminator,
    build_generator,
    dcgan_init,
)
from dcgan.engine.module import Module, Parameter, Sequential, no_grad
from dcgan.engine.optim import SGD, Adam, Optimizer

__all__ = [
    "KERNELS", "SGD", "Adam", "BCEWithLogitsLoss", "BatchNorm2d", "Conv2d", "ConvTranspose2d",
    "Dropout", "EngineDiscriminator", "EngineGenerator", "LeakyReLU", "Linear", "MSELoss",
    "Module", "Optimizer", "Parameter", "ReLU", "Sequential", "Sigmoid", "Tanh",
    "build_discriminator", "build_generator", "dcgan_init", "fold", "get_conv_kernel",
    "no_grad", "set_conv_kernel", "unfold",
]
