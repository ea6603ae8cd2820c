"""A small neural-network engine with hand-written backward passes (no autograd).

See the README section "The engine". Every recorded forward call leaves a node on its
output (what its backward needs, and its inputs' nodes); `engine.backward(loss)` walks
those nodes once, in dependency order (dcgan.engine.graph explains it).
`engine.no_grad()` runs forwards that will not be back-propagated.
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
from dcgan.engine.functions import add, reshape
from dcgan.engine.graph import Node, backward, grad, leaf, no_grad, node_of
from dcgan.engine.layers import BatchNorm2d, Dropout, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from dcgan.engine.losses import BCEWithLogitsLoss, MSELoss
from dcgan.engine.models import (
    EngineDiscriminator,
    EngineGenerator,
    build_discriminator,
    build_generator,
    dcgan_init,
)
from dcgan.engine.module import Module, Parameter, Sequential
from dcgan.engine.optim import SGD, Adam, Optimizer

__all__ = [
    "KERNELS",
    "SGD",
    "Adam",
    "BCEWithLogitsLoss",
    "BatchNorm2d",
    "Conv2d",
    "ConvTranspose2d",
    "Dropout",
    "EngineDiscriminator",
    "EngineGenerator",
    "LeakyReLU",
    "Linear",
    "MSELoss",
    "Module",
    "Node",
    "Optimizer",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "add",
    "backward",
    "build_discriminator",
    "build_generator",
    "dcgan_init",
    "fold",
    "get_conv_kernel",
    "grad",
    "leaf",
    "no_grad",
    "node_of",
    "reshape",
    "set_conv_kernel",
    "unfold",
]
