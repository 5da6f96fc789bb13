"""Weights of weights: every weight a K-vector, mixed per sample by coefficients read from the input.

An MLP 64 -> H -> H -> 10 whose three layers are ``modweights.nn.MixtureLinear`` with K = 3
experts (each layer's router reads that layer's input, so a "3" and a "7" can be seen through
different weights; backprop trains the experts and the routers together), against:

* the same MLP with plain ``nn.Linear`` layers, widened until it has the same number of
  parameters (the fair comparison), and
* the plain MLP of the same width H (fewer parameters).

Both softmax routing (a convex mix, SMEAR / DynamicConv) and sigmoid routing (independent
gates, CondConv; e.g. alpha = [0.5, 0.3, 0.8]) are trained. Each model's learning rate is picked
from {1e-3, 3e-3, 1e-2, 3e-2} by validation accuracy on seed 0. Prints a table of test accuracy over
seeds, saves the mean mixing coefficients per class (seed 0) and the training / validation curves.

    python examples/weights_of_weights.py [--quick] [--seeds N] [--out DIR]
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import modweights.nn as mnn
from _common import (count_params, finish, fmt, load_digits_split, mean_std, parse_args, pyplot, run_seeds,
                     savefig, seed_all, table, train)

K = 3
HIDDEN = 32
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)


class MLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with ReLU; ``routing`` None for plain layers."""

    def __init__(self, hidden: int, routing: str | None = None):
        super().__init__()
        dims = [64, hidden, hidden, 10]
        if routing is None:
            self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:]))
        else:
            self.layers = nn.ModuleList(mnn.MixtureLinear(i, o, K, routing=routing) for i, o in zip(dims, dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    @torch.no_grad()
    def coefficients(self, x):
        """The ``(B, K)`` mixing coefficients of every layer, in order."""
        out = []
        for i, layer in enumerate(self.layers):
            out.append(layer.coefficients(x))
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return out


def matched_width(target: int) -> int:
    """The plain hidden width whose parameter count is closest to ``target``."""
    plain = lambda h: (64 + 1) * h + (h + 1) * h + (h + 1) * 10  # noqa: E731  (the three nn.Linear)
    h = min(range(8, 1024), key=lambda h: abs(plain(h) - target))
    assert plain(h) == count_params(MLP(h))
    return h


def main():
    args = parse_args(__doc__.splitlines()[0], seeds=5)
    data = load_digits_split()
    epochs = 2 if args.quick else 40
    n_mix = count_params(MLP(HIDDEN, "softmax"))
    wide = matched_width(n_mix)
    models = {
        f"mixture K={K} softmax (H={HIDDEN})": lambda: MLP(HIDDEN, "softmax"),
        f"mixture K={K} sigmoid (H={HIDDEN})": lambda: MLP(HIDDEN, "sigmoid"),
        f"plain widened (H={wide})": lambda: MLP(wide),
        f"plain same width (H={HIDDEN})": lambda: MLP(HIDDEN),
    }
    grid = (3e-3,) if args.quick else LR_GRID
    print(f"load_digits, {data.sizes()}; {args.seeds} seeds; {epochs} epochs, Adam, batch 128, learning rate per "
          f"model from {grid} by validation accuracy on seed 0; test accuracy at the epoch of best validation "
          "accuracy")

    def fit(name, seed, lr):
        seed_all(seed)
        model = models[name]()
        h = train(model, data.train, data.val, epochs=epochs, lr=lr, batch_size=128, seed=seed, test_split=data.test)
        c = None
        if name.startswith("mixture"):  # mean coefficients per test class: (layers, classes, K)
            per_layer = model.coefficients(data.test.x)
            c = np.stack([[a[data.test.y == d].mean(0).numpy() for d in range(10)] for a in per_layer])
        return h, c

    runs = run_seeds(models, fit, args.seeds, grid)
    acc = {name: r.test_acc for name, r in runs.items()}
    hists = {name: r.hists for name, r in runs.items()}
    coeffs = {("softmax" if "softmax" in name else "sigmoid"): r.payloads
              for name, r in runs.items() if name.startswith("mixture")}

    rows = [[name, count_params(make()), f"{runs[name].lr:g}", fmt(acc[name])] for name, make in models.items()]
    print()
    print(table(rows, ["model", "parameters", "learning rate", f"test accuracy (mean ± std, {args.seeds} seeds)"]))
    # how different are the weights the digits see: for each layer, the largest gap between two
    # classes' mean coefficient of one expert (0 = every digit sees the same mixture), averaged
    # over layers, then over seeds (experts are numbered arbitrarily in each seed: never average
    # the coefficients themselves over seeds)
    spread = {r: [float(np.mean([(c[l].max(0) - c[l].min(0)).max() for l in range(c.shape[0])])) for c in cs]
              for r, cs in coeffs.items()}
    for r in spread:
        print(f"{r} routing: largest gap between two digits' mean coefficient for one expert, mean over layers: "
              f"{fmt(spread[r])} ({args.seeds} seeds)")
    coeffs = {r: cs[0] for r, cs in coeffs.items()}  # seed 0 shown
    for r, c in coeffs.items():
        print(f"\nmean mixing coefficients per test class, seed 0 ({r} routing; rows: digits 0-9, columns: experts)")
        for l in range(c.shape[0]):
            print(f"  layer {l + 1}: largest gap between classes {(c[l].max(0) - c[l].min(0)).max():.3f}")
            for d in range(10):
                print(f"    {d}: " + "  ".join(f"{v:.3f}" for v in c[l, d]))

    plt = pyplot()
    routings = list(coeffs)
    fig, axes = plt.subplots(len(routings), 3, figsize=(7.5, 3.2 * len(routings)), squeeze=False)
    for r, routing in enumerate(routings):
        for l in range(3):
            ax = axes[r, l]
            im = ax.imshow(coeffs[routing][l], aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{routing}, layer {l + 1}", fontsize=9)
            ax.set_xticks(range(K))
            ax.set_xlabel("expert")
            ax.set_yticks(range(10))
            if l == 0:
                ax.set_ylabel("digit")
            for d in range(10):
                for k in range(K):
                    v = coeffs[routing][l, d, k]
                    ax.text(k, d, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("mean mixing coefficients per digit (test set, seed 0)", fontsize=10)
    fig.tight_layout()
    savefig(fig, args, "weights_of_weights_coeffs.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in models:
        tl = np.mean([h.train_loss for h in hists[name]], 0)
        va = np.mean([h.val_acc for h in hists[name]], 0)
        ep = np.arange(1, len(tl) + 1)
        a1.plot(ep, tl, label=name)
        a2.plot(ep, va, label=name)
    a1.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    a2.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    a2.set_ylim(0.85, 1.0)
    a2.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"mean of {args.seeds} seeds", fontsize=9)
    fig.tight_layout()
    savefig(fig, args, "weights_of_weights_curves.png")

    m = {name: mean_std(v)[0] for name, v in acc.items()}
    names = list(models)
    finish(args, "weights_of_weights", mixture_acc=m[names[0]], mixture_sigmoid_acc=m[names[1]],
           plain_acc=m[names[2]], plain_same_width_acc=m[names[3]], mixture_params=n_mix,
           plain_params=count_params(MLP(wide)), coeff_spread=mean_std(spread["softmax"])[0],
           seeds=args.seeds)


if __name__ == "__main__":
    main()
