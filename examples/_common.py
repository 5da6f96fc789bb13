"""Shared code for the examples: command line, data and splits, the training loop, the seeds table.

Every example trains small networks on scikit-learn's ``load_digits`` (1797 images of 8x8
pixels, 10 classes, shipped with scikit-learn: no download). The split is stratified and
fixed (split seed 0) for every run, so that the methods of an example are compared on the
same test set (60/20/20: 1078 / 360 / 359 images); the seeds vary the initialisation and the
minibatch order. Every run keeps the weights of its epoch with the best validation accuracy and
reports their test accuracy; each configuration's learning rate is picked from a small grid by
validation accuracy on seed 0 (:func:`run_seeds`). The test split never takes part in a choice.

Run an example from the repository root, e.g. ``python examples/weights_of_weights.py``;
``--quick`` is a few-second smoke run (what ``tests/test_examples.py`` runs), ``--seeds N``
the number of seeds, ``--out DIR`` where the plots go.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


# ----------------------------------------------------------------------------- command line


def parse_args(description: str, *, seeds: int, quick_seeds: int = 1, argv=None) -> argparse.Namespace:
    """``--quick``, ``--seeds N``, ``--out DIR``; sets one torch thread (the nets are tiny)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few-second smoke run (few epochs, one seed, no learning-rate search)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds (default {seeds}, {quick_seeds} with --quick)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the plots (default examples/out/)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = quick_seeds if args.quick else seeds
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    args.t0 = time.perf_counter()
    return args


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    """Tensors of one split: ``x`` ``(N, 64)`` pixels in [0, 1], ``y`` ``(N,)`` labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self):
        return len(self.y)


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    num_classes: int = 10

    def sizes(self) -> str:
        return f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}"


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits``' data, ``X (1797, 64)`` in 0..16 and ``y (1797,)``.

    Reads the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, the one
    ``load_digits`` reads) without importing scikit-learn, whose import costs seconds of CPU
    per run; falls back to ``sklearn.datasets.load_digits`` if the file is not where expected.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ModuleNotFoundError("the examples need scikit-learn (pip install scikit-learn) for load_digits")
    for root in spec.submodule_search_locations or []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def stratified_split(y: np.ndarray, fractions, seed: int) -> list[np.ndarray]:
    """Indices split per class in the given fractions (the last part takes the remainder)."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def load_digits_split(val_frac: float = 0.2, test_frac: float = 0.2, split_seed: int = 0) -> Data:
    """``load_digits`` scaled to [0, 1], split stratified into train / val / test (60/20/20 default)."""
    X, y = digits_arrays()
    X = (X / 16.0).astype(np.float32)
    train, val, test = stratified_split(y, (1 - val_frac - test_frac, val_frac, test_frac), split_seed)

    def mk(i):
        return Split(torch.from_numpy(X[i]), torch.from_numpy(y[i]).long())

    return Data(mk(train), mk(val), mk(test))


def select_classes(split: Split, classes, per_class: int | None = None, seed: int = 0) -> Split:
    """The samples of ``classes``, relabelled ``0..len(classes)-1``; at most ``per_class`` of each
    (drawn with ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    keep, labels = [], []
    for new, c in enumerate(classes):
        i = torch.nonzero(split.y == c).flatten()
        if per_class is not None:
            i = i[torch.randperm(len(i), generator=g)[:per_class]]
        keep.append(i)
        labels.append(torch.full((len(i),), new, dtype=torch.long))
    keep = torch.cat(keep)
    return Split(split.x[keep], torch.cat(labels))


def images(x: torch.Tensor) -> torch.Tensor:
    """``(N, 64)`` -> ``(N, 1, 8, 8)``."""
    return x.view(-1, 1, 8, 8)


# ----------------------------------------------------------------------------- training


@dataclass
class History:
    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    best_epoch: int = -1
    test_acc: float = float("nan")
    seconds: float = 0.0


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``model`` (shared tensors counted once, as ``parameters()`` yields them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, forward=None, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` (or ``forward(x)``) on ``split``."""
    was = model.training
    model.eval()
    fwd = forward or model
    loss, correct = 0.0, 0
    for i in range(0, len(split), batch_size):
        logits = fwd(split.x[i:i + batch_size])
        yb = split.y[i:i + batch_size]
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was)
    n = max(len(split), 1)
    return loss / n, correct / n


def train(model: nn.Module, train_split: Split, val_split: Split, *, epochs: int, lr: float = 3e-3,
          batch_size: int = 64, weight_decay: float = 0.0, params=None, forward=None, seed: int = 0,
          test_split: Split | None = None) -> History:
    """Adam on cross-entropy; keeps the weights of the epoch with the best validation accuracy
    (ties: lower validation loss) and reports the test accuracy of those weights.

    Args:
        params: the parameters to train (default: every parameter with ``requires_grad``).
        forward: ``forward(x) -> logits``, when the model is not called directly.
        seed: seeds the minibatch order.
    """
    t0 = time.perf_counter()
    fwd = forward or model
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    hist = History()
    best, best_key = None, None
    n = len(train_split)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            j = perm[i:i + batch_size]
            loss = F.cross_entropy(fwd(train_split.x[j]), train_split.y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(j)
        hist.train_loss.append(total / n)
        vl, va = evaluate(model, val_split, fwd)
        hist.val_loss.append(vl)
        hist.val_acc.append(va)
        key = (va, -vl)
        if best_key is None or key > best_key:
            best_key, best, hist.best_epoch = key, copy.deepcopy(model.state_dict()), epoch
    if best is not None:
        model.load_state_dict(best)
    if test_split is not None:
        hist.test_acc = evaluate(model, test_split, fwd)[1]
    hist.seconds = time.perf_counter() - t0
    return hist


class PerSeed(dict):
    """``seed -> build(seed)``, each built once on first use (the pretrained model that every run
    of a seed starts from)."""

    def __init__(self, build):
        super().__init__()
        self.build = build

    def __missing__(self, seed):
        self[seed] = value = self.build(seed)
        return value


@dataclass
class SeedRuns:
    """The runs of one configuration: the chosen learning rate and one result per seed."""

    lr: float | None
    val_by_lr: dict
    hists: list = field(default_factory=list)
    payloads: list = field(default_factory=list)

    @property
    def test_acc(self) -> list:
        return [h.test_acc for h in self.hists]


def _val_key(h: History):
    if not h.val_acc:  # not trained (e.g. "no adaptation"): nothing to choose
        return (0.0, 0.0)
    return (h.val_acc[h.best_epoch], -h.val_loss[h.best_epoch])


def run_seeds(keys, fit, seeds: int, grid, label=str) -> dict:
    """For every configuration in ``keys``: pick the learning rate from ``grid`` whose run on
    seed 0 reached the best validation accuracy (ties: lower validation loss), then run seeds
    1..seeds-1 with it. The test split plays no part in the choice.

    Args:
        fit: ``fit(key, seed, lr) -> (History, payload)``.
        grid: learning rates, or a dict ``key -> grid`` (a one-element grid: no choice).
        label: ``label(key) -> str`` for the log lines.

    Returns:
        ``{key: SeedRuns}``.
    """
    out = {}
    for key in keys:
        g = grid[key] if isinstance(grid, dict) else grid
        tried = {lr: fit(key, 0, lr) for lr in g}
        lr = max(g, key=lambda lr: _val_key(tried[lr][0]))
        runs = SeedRuns(lr, {lr_: _val_key(tried[lr_][0])[0] for lr_ in g})
        for seed in range(seeds):
            h, payload = tried[lr] if seed == 0 else fit(key, seed, lr)
            runs.hists.append(h)
            runs.payloads.append(payload)
            if seed == 0 and len(g) > 1:
                choice = ", ".join(f"{lr_:g}: {a:.3f}" for lr_, a in runs.val_by_lr.items())
                print(f"  {label(key)}: learning rate {lr:g} (validation accuracy on seed 0 -- {choice})", flush=True)
            print(f"    seed {seed}  {label(key)}  test acc {h.test_acc:.4f}  best epoch {h.best_epoch + 1}  "
                  f"{h.seconds:.1f} s", flush=True)
        out[key] = runs
    return out


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------- reporting


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(values, digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(rows, headers) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def result_line(example: str, **metrics) -> str:
    """``RESULT <example> key=value ...``: floats with 4 significant digits; the last line every example prints."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
    return " ".join(["RESULT", example, *parts])


def finish(args, example: str, **metrics) -> None:
    print(f"[{example}] {time.perf_counter() - args.t0:.1f} s", flush=True)
    print(result_line(example, **metrics), flush=True)


def grouped_bars(ax, series: dict, xticklabels, hline=None) -> None:
    """Bars of mean ± std accuracy: one group per x tick, one bar per series within a group.

    ``series`` maps a legend label to its per-group lists of values (one list per tick);
    ``hline`` = ``(y, label)`` adds a dashed reference line. The legend sits to the right.
    """
    width = 0.8 / len(series)
    for j, (label, groups) in enumerate(series.items()):
        ms = [mean_std(v) for v in groups]
        ax.bar(np.arange(len(groups)) + (j - (len(series) - 1) / 2) * width, [m for m, _ in ms], width,
               yerr=[s for _, s in ms], capsize=2, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="k", ls="--", lw=1, label=hline[1])
    ax.set_xticks(range(len(xticklabels)))
    ax.set_xticklabels(list(xticklabels))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (trainable parameters)",
              title_fontsize=7)


def savefig(fig, args, name: str) -> str:
    path = os.path.join(args.out, name)
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib's pyplot with a non-interactive backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
