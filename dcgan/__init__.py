"""dcgan: train, evaluate, benchmark and explain Deep Convolutional GANs on PyTorch."""

__version__ = "0.1.0"
