"""Quickstart: train a short Fashion-MNIST run, load it, sample, evaluate, save a grid.

Run it from any folder with `python examples/quickstart.py`; it writes runs/quick/ and
runs/quick-hf/ there. It uses only the public API (`import dcgan`), and the code below
is the README's "Python API" section word for word: the test suite runs this file
(tests/test_quickstart.py), so that section cannot stop working unnoticed.

Why a script and not a notebook: a script runs in pytest as it is, with nothing more to
install (no nbclient, no Jupyter kernel to start), and it diffs and reviews as plain
code. Each line works unchanged in a notebook cell; there, "interrupt kernel" stops
dcgan.train with the training state saved, and dcgan.train(resume=run.path) goes on.

Two kimg make a demonstration, not a model (the samples are still blobs; the preset's
own length is 150 kimg): about a minute on a 2-core CPU, most of it spent once, on
measuring this machine's fastest precision and, for `features="domain"`, on training
the Fashion-MNIST classifier whose features the FID uses; both are cached.
`force=True` lets the script run again over its own runs/quick.
"""

import dcgan

run = dcgan.train("fmnist32", out="runs/quick", kimg=2, force=True, progress=False)
G = dcgan.load(run.path)  # the G-EMA snapshot, as `dcgan sample` reads it
images = G.sample(64, seed=0)  # uint8 (64, 1, 32, 32): the images of `dcgan sample --seed 0`
dcgan.save_grid(images, "runs/quick/grid.png")
scores = dcgan.evaluate(run.path, "fashion-mnist:test", features="domain", n=1000)
print(f"FID {scores['fid']:.1f}, KID {scores['kid'][0]:.4f} ({scores['features']})")
G.save_pretrained("runs/quick-hf")  # model.safetensors, config.json, a model card
