"""`dcgan bench`: every throughput table of the toolkit, timed by one loop.

- `timing`: the in-turns timing loop (each candidate one call in turn, per window)
  that every table below is built from, and the clocks.
- `train`: train-step images/s of the canonical reference and of each optimisation
  over the very `Step` that `dcgan train` runs (the default table).
- `engine`: dcgan.engine's GAN step and seed 003's denoiser against torch autograd.
- `generator`: G's inference speed, eager and as exported.
- `features`: the feature extractors of `dcgan eval`.
- `cli`: `dcgan bench train|features|generator|engine`, one subcommand per table
  (`dcgan bench` alone is `train`; the old flags --features, --generator, --engine
  are deprecated aliases).
"""
