"""Parameter sharing: one weight bank shared by several layers, each layer with its own router.

The network: ``Linear(64, H)`` -> 3 residual blocks ``h = h + relu(layer_l(h))`` -> ``Linear(H, 10)``.
The three block layers (H -> H) are, in turn:

* ``plain``: three independent ``nn.Linear`` layers;
* ``plain, one shared layer``: one ``nn.Linear`` applied three times (ALBERT-style sharing);
* ``mixture, own banks``: three ``MixtureLinear`` layers with K = 3 experts each;
* ``mixture, one shared bank``: three ``MixtureLinear`` layers whose bank (and bias) is one and
  the same tensor; each keeps its own router, so each layer mixes the shared experts its own
  way, per sample. With K = 3 the shared bank has the parameters of the three plain layers.

Sweeps the width H and prints parameter count vs test accuracy over seeds; plots them.

    python examples/parameter_sharing.py [--quick] [--seeds N] [--out DIR]
"""
from __future__ import annotations

import torch
from torch import nn

import modweights.nn as mnn
from _common import (count_params, finish, fmt, load_digits_split, mean_std, parse_args, pyplot, run_seeds, savefig,
                     seed_all, table, train)

K = 3
BLOCKS = 3
LR_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
VARIANTS = ("plain", "plain, one shared layer", "mixture, own banks", "mixture, one shared bank")


class Net(nn.Module):
    def __init__(self, hidden: int, variant: str):
        super().__init__()
        self.stem = nn.Linear(64, hidden)
        if variant == "plain":
            blocks = [nn.Linear(hidden, hidden) for _ in range(BLOCKS)]
        elif variant == "plain, one shared layer":
            blocks = [nn.Linear(hidden, hidden)] * BLOCKS  # the same module three times
        elif variant in ("mixture, own banks", "mixture, one shared bank"):
            blocks = [mnn.MixtureLinear(hidden, hidden, K) for _ in range(BLOCKS)]
            if variant == "mixture, one shared bank":
                for b in blocks[1:]:  # tie the bank and its bias; the routers stay separate
                    b.weight = blocks[0].weight
                    b.bias = blocks[0].bias
        else:
            raise ValueError(f"unknown variant {variant!r}")
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for b in self.blocks:
            h = h + torch.relu(b(h))
        return self.head(h)


def main():
    args = parse_args(__doc__.splitlines()[0], seeds=5)
    data = load_digits_split()
    widths = (16,) if args.quick else (8, 16, 32)
    epochs = 3 if args.quick else 25
    grid = (3e-3,) if args.quick else LR_GRID
    H0 = widths[len(widths) // 2]
    print(f"load_digits, {data.sizes()}; {args.seeds} seeds; {epochs} epochs, Adam, batch 128, learning rate per "
          f"variant from {grid} by validation accuracy on seed 0 at H={H0} (and used at every width); test accuracy "
          "at the epoch of best validation accuracy")
    params = {(v, H): count_params(Net(H, v)) for v in VARIANTS for H in widths}

    def fit(key, seed, lr):
        v, H = key
        seed_all(seed)
        model = Net(H, v)
        return train(model, data.train, data.val, epochs=epochs, lr=lr, batch_size=128, seed=seed,
                     test_split=data.test), None

    label = lambda key: f"H={key[1]:2d} {key[0]} ({params[key]} parameters)"  # noqa: E731
    runs = run_seeds([(v, H0) for v in VARIANTS], fit, args.seeds, grid, label)
    rest = [(v, H) for H in widths if H != H0 for v in VARIANTS]
    runs.update(run_seeds(rest, fit, args.seeds, {(v, H): (runs[(v, H0)].lr,) for v, H in rest}, label))
    acc = {key: r.test_acc for key, r in runs.items()}

    rows = [[v, H, params[(v, H)], f"{runs[(v, H)].lr:g}", fmt(acc[(v, H)])] for H in widths for v in VARIANTS]
    print()
    print(table(rows, ["block layers", "H", "parameters", "learning rate", f"test accuracy ({args.seeds} seeds)"]))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for v, marker in zip(VARIANTS, "os^D"):
        ms = [mean_std(acc[(v, H)]) for H in widths]
        ax.errorbar([params[(v, H)] for H in widths], [m for m, _ in ms], yerr=[s for _, s in ms], marker=marker,
                    capsize=2, label=v)
        for H in widths:
            ax.annotate(f"H={H}", (params[(v, H)], mean_std(acc[(v, H)])[0]), fontsize=6,
                        xytext=(3, -8), textcoords="offset points")
    ax.set(xscale="log", xlabel="parameters", ylabel="test accuracy",
           title=f"parameters vs accuracy (mean ± std, {args.seeds} seeds)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    savefig(fig, args, "parameter_sharing.png")

    H = H0
    m = {k: mean_std(a)[0] for k, a in acc.items()}
    finish(args, "parameter_sharing", width=H,
           shared_bank_acc=m[("mixture, one shared bank", H)], own_banks_acc=m[("mixture, own banks", H)],
           plain_acc=m[("plain", H)], plain_shared_acc=m[("plain, one shared layer", H)],
           shared_bank_params=params[("mixture, one shared bank", H)],
           own_banks_params=params[("mixture, own banks", H)], plain_params=params[("plain", H)],
           plain_shared_params=params[("plain, one shared layer", H)], seeds=args.seeds)


if __name__ == "__main__":
    main()
