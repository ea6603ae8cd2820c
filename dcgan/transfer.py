"""How much did D learn about images? Linear probes on its features (DCGAN paper, 5.1).

The paper trains on one data set, then reuses D as a fixed feature extractor:
every convolutional layer's output (after its activation) is max-pooled to a
4x4 grid, flattened and concatenated, and a linear classifier is trained on
top with a few labels. `run_transfer` does that for a run folder and puts three
baselines beside it, all with the same labelled subsets and test split:

- raw pixels with the same linear classifier (what the features add at all);
- an untrained D of the same architecture, initialised exactly as this run's D
  was at step 0 (same seed, same draw order): what adversarial training added
  over random convolutional features;
- the same D architecture trained supervised from scratch on the same labels
  (D's body + a linear head on the same pooled features): what the GAN's
  unlabelled data bought over using the labels directly.

The classifier is scikit-learn's multinomial logistic regression (L-BFGS) on
standardised features (`StandardScaler`); its L2 weight is chosen on a
stratified 20 % of the labelled subset held out for validation, then the model
is refitted on the whole subset. Accuracies are mean and standard deviation
over `draws` independent label draws.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm import tqdm

from dcgan import checkpoint
from dcgan.config import Config
from dcgan.errors import UserError
from dcgan.models import (
    Discriminator,
    block_widths,
    build_discriminator,
    build_generator,
    plain_weights,
)
from dcgan.pixels import from_uint8
from dcgan.rundir import RunDir

GRID = 4  # each layer's activations are max-pooled to GRID x GRID, as in the paper
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # weight of 0.5 * |W|^2 beside the mean loss
VAL_FRACTION = 0.2
MAX_TRAIN = 10_000  # "all": at most this many labelled images (a random subsample)

METHODS = {  # result key -> table column
    "d_features": "D features",
    "pixels": "raw pixels",
    "untrained_d": "untrained D",
    "supervised": "supervised D",
}

# --------------------------------------------------------------------- features


def feature_dim(ndf: int, resolution: int) -> int:
    """Length of `d_features`: 16 per channel of every hidden layer of D.

    64x64, ndf 64: widths 64, 128, 256, 512 -> (64 + 128 + 256 + 512) * 16 = 15360.
    """
    return GRID * GRID * sum(block_widths(ndf, resolution))


def pooled_features(layers: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run x (N, C, R, R) through `layers`; every activation's output (N, c, s, s) is
    max-pooled to (N, c, 4, 4) and flattened; returns their concatenation (N, F)."""
    feats = []
    for layer in layers:
        x = layer(x)
        if isinstance(layer, (nn.LeakyReLU, nn.ReLU)):
            # the last hidden layer is already 4x4: pooling it is the identity
            feats.append(F.adaptive_max_pool2d(x, GRID).flatten(1))
    return torch.cat(feats, 1)


def body(d: Discriminator) -> nn.Sequential:
    """D without its final 4x4 logit convolution (a view sharing D's modules)."""
    return d.main[:-1]


def d_features(d: Discriminator, x: torch.Tensor) -> torch.Tensor:
    """Images x (N, nc, R, R) in [-1, 1] -> D features (N, feature_dim(ndf, R))."""
    return pooled_features(body(d), x)


@torch.no_grad()
def extract(
    d: Discriminator,
    images: np.ndarray,
    device: str | torch.device = "cpu",
    batch: int = 256,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """uint8 images (N, C, R, R) -> CPU float32 features (N, F), D in eval mode."""
    d = d.to(device).eval()
    out = []
    for i in tqdm(
        range(0, len(images), batch),
        desc=desc,
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    ):
        x = from_uint8(images[i : i + batch]).to(device)
        out.append(d_features(d, x).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------- classifier


def stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (fit, val) into y: about `fraction` of each class held out, but never
    a class's last example (classes with one example stay whole in fit)."""
    fit, val = [], []
    for c in np.unique(y):
        pos = rng.permutation(np.flatnonzero(y == c))
        k = min(len(pos) - 1, max(1, round(fraction * len(pos))))
        val.append(pos[:k])
        fit.append(pos[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def blas_threads(work: float):
    """One BLAS thread for small fits, the default for large ones.

    L-BFGS on a few hundred examples is a stream of tiny vector operations; a
    multi-threaded OpenBLAS wakes its threads for each, and on a busy machine
    that cost 12 s instead of 0.03 s for a 36-iteration fit here. work: n * features.
    """
    if work > 5e7:  # e.g. 10,000 x 15,360: each matrix product is worth its threads
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def linear_probe(
    x_train: torch.Tensor,
    y_train: np.ndarray,
    x_test: torch.Tensor,
    y_test: np.ndarray,
    n_classes: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Test accuracy of the linear classifier and its chosen L2 weight.

    scikit-learn's multinomial LogisticRegression (L-BFGS, at most 100 iterations,
    the bias unpenalised) on StandardScaler'd features. Its objective is
    C * sum(loss) + |W|^2 / 2, i.e. mean(loss) + l2/2 |W|^2 with C = 1 / (l2 n).
    l2 is chosen on a stratified validation split from L2_GRID, strongest penalty
    first, each fit warm-started from the last (the weakly penalised fits on
    thousands of examples are the slow ones; this way they start near their answer).
    x_train (n, F), x_test (m, F); labels int in [0, n_classes) (test labels of
    classes absent from training may be -1: always wrong).
    """
    with blas_threads(x_train.shape[0] * x_train.shape[1]):
        fit, val = stratified_split(y_train, VAL_FRACTION, rng)
        xs = x_train.numpy()
        l2 = 1e-2  # no class has two examples: nothing to validate on, take the middle
        clf = LogisticRegression(max_iter=100, warm_start=True)
        if len(val):
            scaler = StandardScaler().fit(xs[fit])
            xf, xv = scaler.transform(xs[fit]), scaler.transform(xs[val])
            scores = {}
            for lam in sorted(L2_GRID, reverse=True):
                clf.set_params(C=1.0 / (lam * len(fit)))
                with warnings.catch_warnings():  # 100 iterations is the budget, by design
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    clf.fit(xf, y_train[fit])
                scores[lam] = float((clf.predict(xv) == y_train[val]).mean())
            l2 = max(sorted(L2_GRID, reverse=True), key=lambda lam: scores[lam])  # ties: strongest
        scaler = StandardScaler().fit(xs)
        final = LogisticRegression(C=1.0 / (l2 * len(xs)), max_iter=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            final.fit(scaler.transform(xs), y_train)
        pred = final.predict(scaler.transform(x_test.numpy()))
    return float((pred == np.asarray(y_test)).mean()), l2


# --------------------------------------------------------------------- supervised baseline


class SupervisedD(nn.Module):
    """D's body + a linear head on the pooled features: images -> class logits (N, K)."""

    def __init__(self, d: Discriminator, n_classes: int, dim: int):
        super().__init__()
        self.body = body(d)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.body, x))


def train_supervised(
    d_init: Discriminator,
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    seed: int,
    device: str | torch.device = "cpu",
    epochs: int = 3,
    min_steps: int = 150,
    batch: int = 64,
    lr: float = 1e-3,
    progress: bool = False,
) -> SupervisedD:
    """Train a copy of d_init (+ a head) with cross-entropy and Adam on (images, labels).

    Runs max(min_steps, epochs * ceil(n / batch)) steps: tiny label sets need
    more passes than a few epochs to fit, large ones stay cheap on a CPU.
    """
    n = len(images)
    ndf = d_init.main[0].out_channels  # D's first conv: nc -> ndf
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head's init and the batch order
        d = Discriminator(ndf, d_init.nc, d_init.resolution)
        d.load_state_dict(d_init.state_dict())
        model = SupervisedD(d, n_classes, feature_dim(ndf, d_init.resolution)).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        x_all = torch.from_numpy(np.ascontiguousarray(images))  # uint8 (n, C, R, R)
        y_all = torch.as_tensor(labels, dtype=torch.int64)
        b = min(batch, n)
        steps = max(min_steps, epochs * math.ceil(n / b))
        order = torch.randperm(n)
        pos = 0
        for _ in tqdm(
            range(steps),
            desc=f"supervised D: train on {n}",
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
            leave=False,
        ):
            if pos + b > n:  # a fresh permutation each pass; the short tail is dropped
                order, pos = torch.randperm(n), 0
            idx = order[pos : pos + b]
            pos += b
            x = from_uint8(x_all[idx]).to(device)
            loss = F.cross_entropy(model(x), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        recalibrate_batchnorm(model, x_all, device)
    return model.eval()


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu", batch: int = 256
) -> None:
    """Re-estimate every BatchNorm's running statistics with the final weights.

    The running averages (momentum 0.1) trail weights that moved fast: after 30
    steps from scratch, eval mode scored 20 % on the very images it had fitted
    (train mode: 100 %). One pass over `images` (uint8 (n, C, R, R)) with a
    cumulative average (momentum None) gives the statistics of the final network.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    model.train()
    for i in range(0, len(images), batch):
        model(from_uint8(images[i : i + batch]).to(device))
    for m in bns:
        m.momentum = 0.1


@torch.no_grad()
def classify(
    model: SupervisedD,
    images: np.ndarray,
    device: str | torch.device = "cpu",
    batch: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Predicted classes (N,) of uint8 images, BatchNorm on its running statistics."""
    preds = []
    for i in tqdm(
        range(0, len(images), batch),
        desc="supervised D: test",
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    ):
        preds.append(model(from_uint8(images[i : i + batch]).to(device)).argmax(1).cpu())
    return torch.cat(preds).numpy()


# --------------------------------------------------------------------- the experiment


def _parse_label_counts(labels: Iterable[int | str]) -> list[int | str]:
    out: list[int | str] = []
    for n in labels:
        if isinstance(n, str) and n.strip() == "all":
            out.append("all")
            continue
        try:
            k = int(n)
        except (TypeError, ValueError):
            raise UserError(
                f"--labels: {n!r} is neither a number of labels per class nor 'all'"
            ) from None
        if k < 2:
            # one label per class leaves nothing to choose the regularisation on
            raise UserError(f"--labels: need at least 2 labels per class, got {k}")
        out.append(k)
    if not out:
        raise UserError("--labels: give at least one count, e.g. 100,1000,all")
    return out


def draw_subset(
    y: np.ndarray, n: int | str, rng: np.random.Generator, max_train: int = MAX_TRAIN
) -> np.ndarray:
    """Sorted indices into the train split: n per class, or all (at most max_train)."""
    if n == "all":
        idx = np.arange(len(y))
        if len(idx) > max_train:
            idx = rng.choice(idx, max_train, replace=False)
        return np.sort(idx)
    chosen = []
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        if len(pos) < n:
            raise UserError(f"--labels {n}: class {c} has only {len(pos)} training images")
        chosen.append(rng.choice(pos, n, replace=False))
    return np.sort(np.concatenate(chosen))


def _summary(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_draw": values,
    }


def run_transfer(
    run_dir: str,
    labels: list[int | str] = [100, 1000, "all"],  # noqa: B006
    source: str | None = None,
    draws: int = 3,
    device: str = "cpu",
    progress: bool = True,
    max_train: int = MAX_TRAIN,
    sup_epochs: int = 3,
    sup_min_steps: int = 150,
) -> dict[str, Any]:
    """Linear-probe accuracies of a run's D and the three baselines; see the module doc.

    labels: labelled images per class (ints >= 2) and/or "all" (the whole train
    split, randomly subsampled to max_train). source defaults to the run's own
    data set, read at the run's resolution and channels; it needs labels and a
    test split. sup_epochs and sup_min_steps size the supervised baseline's
    training (see `train_supervised`). Returns a JSON-ready dict; `format_table`
    prints it.
    """
    from dcgan.data import load_images  # the data module pulls Pillow: load it when needed

    start = time.perf_counter()
    counts = _parse_label_counts(labels)
    if draws < 1:
        raise UserError(f"--draws must be >= 1, got {draws}")
    run = RunDir(run_dir)
    state = checkpoint.load_state(run.checkpoint)
    cfg = Config.from_dict(state["config"])  # resolved: channels filled in by training
    resolution, nc = cfg.data.resolution, cfg.data.channels
    if nc == 0:  # runs from before training recorded it: D's first conv is (ndf, nc, 4, 4)
        nc = (
            state["D"]
            .get("main.0.weight", state["D"].get("main.0.parametrizations.weight.original"))
            .shape[1]
        )
    src = source or cfg.data.dataset

    train = load_images(src, resolution, nc, "train", cfg.data.cache_dir, progress)
    if train.labels is None:
        raise UserError(
            f"{src} has no labels: transfer needs a labelled source with a test "
            "split (e.g. --source fashion-mnist, mnist, or a CIFAR-10 folder)"
        )
    test = load_images(src, resolution, nc, "test", cfg.data.cache_dir, progress)
    classes = np.unique(train.labels)
    k = len(classes)
    if k < 2:
        raise UserError(f"{src} has a single class in its train split: nothing to classify")
    # labels -> 0..K-1; a test class never seen in training becomes -1 (always wrong)
    y_train = np.searchsorted(classes, train.labels)
    y_test = np.where(np.isin(test.labels, classes), np.searchsorted(classes, test.labels), -1)

    # the trained D, and the same architecture as it was before its first step:
    # training_loop seeds with train.seed, then builds G, then D
    d_trained = build_discriminator(cfg.model, nc, resolution)  # spectral norm if trained so
    d_trained.load_state_dict(state["D"])
    d_untrained = build_discriminator(cfg.model, nc, resolution)
    if run.d_init.is_file():  # recorded by training before its first step
        d_untrained.load_state_dict(load_file(str(run.d_init)))
    else:  # runs from before that file existed: replay training_loop's seeding (G, then D)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            build_generator(cfg.model, nc, resolution)
            d_untrained = build_discriminator(cfg.model, nc, resolution)
    # features of the normalised weights, as D used them (no power iteration at eval)
    d_trained, d_untrained = plain_weights(d_trained), plain_weights(d_untrained)

    # every labelled subset first, so each image's features are computed once
    subsets: dict[tuple[int, int | str], np.ndarray] = {}
    for draw in range(draws):
        rng = np.random.default_rng([cfg.train.seed, draw])
        for n in counts:
            subsets[draw, n] = draw_subset(y_train, n, rng, max_train)
    used = np.unique(np.concatenate(list(subsets.values())))  # sorted train indices

    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # method -> (train rows, test)
    for name, d in (("d_features", d_trained), ("untrained_d", d_untrained)):
        feats[name] = (
            extract(
                d, train.images[used], device, progress=progress, desc=f"{METHODS[name]}: train"
            ),
            extract(d, test.images, device, progress=progress, desc=f"{METHODS[name]}: test"),
        )
    feats["pixels"] = (
        from_uint8(train.images[used]).flatten(1),
        from_uint8(test.images).flatten(1),
    )

    rows = []
    # one tick per linear probe (len(L2_GRID) + 1 fits each) and per supervised model
    bar = tqdm(
        total=len(counts) * draws * (len(feats) + 1),
        desc="transfer",
        unit="model",
        disable=not progress,
        dynamic_ncols=True,
    )
    for n in counts:
        acc: dict[str, list[float]] = {m: [] for m in METHODS}
        chosen_l2: dict[str, list[float]] = {m: [] for m in METHODS if m != "supervised"}
        for draw in range(draws):
            idx = subsets[draw, n]
            rows_in_used = np.searchsorted(used, idx)
            for m, (f_train, f_test) in feats.items():
                bar.set_postfix_str(f"{n} labels/class, draw {draw + 1}: {METHODS[m]}")
                # the same validation split for every kind of feature
                rng = np.random.default_rng([cfg.train.seed, draw, 1])
                a, lam = linear_probe(f_train[rows_in_used], y_train[idx], f_test, y_test, k, rng)
                acc[m].append(a)
                chosen_l2[m].append(lam)
                bar.update(1)
            bar.set_postfix_str(f"{n} labels/class, draw {draw + 1}: {METHODS['supervised']}")
            model = train_supervised(
                d_untrained,
                train.images[idx],
                y_train[idx],
                k,
                seed=cfg.train.seed * 1000 + draw,
                device=device,
                epochs=sup_epochs,
                min_steps=sup_min_steps,
                progress=progress,
            )
            pred = classify(model, test.images, device, progress=progress)
            acc["supervised"].append(float((pred == y_test).mean()))
            bar.update(1)
        rows.append(
            {
                "labels": n,
                "n_train": len(subsets[0, n]),
                **{m: _summary(acc[m]) for m in METHODS},
                "l2": chosen_l2,
            }
        )
    bar.close()

    notes = []
    if "all" in counts and len(y_train) > max_train:
        notes.append(
            f"'all' uses a random {max_train} of the {len(y_train)} training images "
            "(max_train) to keep the classifiers' training affordable"
        )
    return {
        "run": str(run.path),
        "source": train.source,
        "resolution": resolution,
        "channels": nc,
        "classes": k,
        "n_train_split": len(y_train),
        "n_test": len(y_test),
        "draws": draws,
        "feature_dims": {
            "d": feature_dim(cfg.model.ndf, resolution),
            "pixels": nc * resolution * resolution,
        },
        "classifier": "multinomial logistic regression (scikit-learn L-BFGS) on standardised "
        "features; "
        f"L2 weight from {list(L2_GRID)} on a stratified {VAL_FRACTION:.0%} "
        "validation split of the labelled images",
        "supervised": "D's body + linear head on the pooled features, Adam lr 1e-3, "
        f"max({sup_min_steps}, {sup_epochs} epochs) steps of batch 64, "
        "cross-entropy, from the untrained D's weights",
        "rows": rows,
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table of test accuracy (%), mean ± std over draws."""
    head = ["labels/class", "train imgs", *METHODS.values()]
    body_rows = []
    for r in result["rows"]:
        cells = [str(r["labels"]), str(r["n_train"])]
        cells += [f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['std']:.1f}" for m in METHODS]
        body_rows.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body_rows)) for i, h in enumerate(head)]
    lines = [
        f"{result['source']} test split ({result['n_test']} images, {result['classes']} "
        f"classes) at {result['resolution']}px x {result['channels']}ch: test accuracy %, "
        f"mean ± std over {result['draws']} label draw(s)"
    ]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body_rows
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
