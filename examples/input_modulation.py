"""Training by modifying the input: the weights stay frozen, a learned modulation adapts them.

Scaling the input channels of a linear layer is the same as modulating its weight columns:
``(W * s[None, :]) @ x == W @ (s * x)``. So ``modulated_linear(x, W, s, demodulate=False)`` equals
``F.linear(x * s, W)``: the example first prints the largest difference, for the ``reference``
backend (which forms ``W * s`` for every sample) and the ``torch`` backend (which scales the
input and never forms it), then uses the op to adapt a frozen network.

A plain MLP 64 -> 64 -> 64 -> 10 is trained on clean digits, frozen, and shown shifted digits
(inverted, ``1 - x``; rotated by 90 degrees). With every weight and bias of the MLP frozen,
only a modulation of each layer's input channels is trained on the shifted training split:

* ``input scale``: one learned scale per input pixel (64 parameters);
* ``scale per layer``: one learned scale per input channel of each of the 3 layers (IA3-like);
* ``per-sample styles``: a small network reads the (shifted) image and produces every layer's
  styles for that sample (input-conditioned IA3: ``s_b = g(x_b)``), applied with
  ``modulated_linear`` without demodulation;
* for reference (not input modulation): ``fine-tune all weights`` of the MLP, and ``train from
  scratch`` a new MLP on the shifted training split.

Each method's learning rate is picked from a small grid by validation accuracy on seed 0.
Reports test accuracy before and after adaptation over seeds (each seed trains its own MLP).

    python examples/input_modulation.py [--quick] [--seeds N] [--out DIR]
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import modweights.functional as MF
from _common import (History, PerSeed, Split, count_params, evaluate, finish, fmt, grouped_bars, images,
                     load_digits_split, mean_std, parse_args, pyplot, run_seeds, savefig, seed_all, table, train)

DIMS = [64, 64, 64, 10]
MODULATION_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
FINETUNE_GRID = (3e-3, 1e-2, 3e-2)
SHIFTS = {
    "inverted": lambda x: 1.0 - x,
    "rotated 90": lambda x: torch.rot90(images(x), 1, (2, 3)).reshape(-1, 64),
}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(DIMS, DIMS[1:]))

    def forward(self, x, styles=None):
        """``styles``: None, or one ``(B, I_l)`` (or ``(I_l,)``) tensor (or None) per layer."""
        for i, layer in enumerate(self.layers):
            s = None if styles is None else styles[i]
            if s is None:
                x = layer(x)
            else:
                s = s.expand(x.shape[0], -1) if s.dim() == 1 else s
                x = MF.modulated_linear(x, layer.weight, s, demodulate=False, bias=layer.bias)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class StaticScales(nn.Module):
    """A learned per-channel scale for the inputs of the listed layers, starting at 1."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(DIMS[l])) for l in layers)

    def forward(self, x):
        out = [None] * (len(DIMS) - 1)
        for l, s in zip(self.layers, self.scales):
            out[l] = s
        return out


class StyleNet(nn.Module):
    """Per-sample styles for every layer from the input image: ``s = 1 + MLP(x)`` (starts at 1)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.sizes = DIMS[:-1]
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, sum(self.sizes)))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x):
        return list((1.0 + self.body(x)).split(self.sizes, dim=1))


class Adapted(nn.Module):
    """The frozen MLP, its inputs modulated by ``mod`` (a module ``x -> styles per layer``)."""

    def __init__(self, base: MLP, mod: nn.Module | None):
        super().__init__()
        self.base, self.mod = base, mod

    def forward(self, x):
        return self.base(x, None if self.mod is None else self.mod(x))


def equivalence_check() -> float:
    """Largest |modulating the weights - scaling the inputs| over two implementations of
    ``modulated_linear(x, W, s, demodulate=False, bias=b)``, against ``F.linear(x * s, W, b)``.

    The ``reference`` backend forms every sample's modulated weight ``W * s_b`` and multiplies;
    the ``torch`` backend (the CPU default) scales the input and runs one GEMM, so it matches
    ``F.linear(x * s, W, b)`` to the bit; the reference differs only by float rounding.
    """
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(256, 64, generator=g), torch.randn(48, 64, generator=g)
    s, b = torch.randn(256, 64, generator=g), torch.randn(48, generator=g)
    scaled_input = F.linear(x * s, W, b)
    worst = 0.0
    for backend, what in (("reference", "forms W * s per sample"), ("torch", "scales the input")):
        mod = MF.modulated_linear(x, W, s, demodulate=False, bias=b, backend=backend)
        diff = (mod - scaled_input).abs().max().item()
        worst = max(worst, diff)
        print(f"modulated_linear(x, W, s, demodulate=False), backend {backend!r} ({what}) vs F.linear(x * s, W): "
              f"max |difference| = {diff:.3g}")
    print(f"  (x, s: (256, 64), W: (48, 64), fp32; outputs up to {scaled_input.abs().max().item():.3g})")
    return worst


def shifted(split: Split, fn) -> Split:
    return Split(fn(split.x), split.y)


def main():
    args = parse_args(__doc__.splitlines()[0], seeds=5)
    diff = equivalence_check()
    data = load_digits_split()
    base_epochs, epochs = (3, 2) if args.quick else (40, 30)
    methods = ("no adaptation", "input scale", "scale per layer", "per-sample styles",
               "fine-tune all weights (reference)", "train from scratch (reference)")
    grids = {"no adaptation": (None,), "fine-tune all weights (reference)": FINETUNE_GRID,
             "train from scratch (reference)": FINETUNE_GRID}
    shifts = SHIFTS if not args.quick else {"inverted": SHIFTS["inverted"]}
    keys = [(sh, m) for sh in shifts for m in methods]
    grid = {(sh, m): (1e-2,) if args.quick and m != "no adaptation" else grids.get(m, MODULATION_GRID)
            for sh, m in keys}
    print(f"load_digits, {data.sizes()}; {args.seeds} seeds; base MLP {DIMS} trained {base_epochs} epochs on clean "
          f"digits (Adam lr 3e-3, batch 128); each adaptation {epochs} epochs on the shifted training split, Adam, "
          f"batch 128, learning rate from {MODULATION_GRID} (modulation) or {FINETUNE_GRID} (references) by "
          "validation accuracy on seed 0; test accuracy at the epoch of best validation accuracy")

    def pretrain(seed):
        seed_all(seed)
        base = MLP()
        h = train(base, data.train, data.val, epochs=base_epochs, lr=3e-3, batch_size=128, seed=seed,
                  test_split=data.test)
        for p in base.parameters():
            p.requires_grad_(False)
        print(f"  seed {seed}: base MLP on the clean test split {h.test_acc:.4f}", flush=True)
        return base, h

    bases = PerSeed(pretrain)  # seed -> (frozen MLP, its History on clean digits)

    def fit(key, seed, lr):
        sh, name = key
        base = bases[seed][0]
        tr, va, te = (shifted(s, shifts[sh]) for s in (data.train, data.val, data.test))
        seed_all(seed)
        if name == "no adaptation":
            h = History()
            h.test_acc = evaluate(base, te)[1]
            return h, 0
        if name.startswith("fine-tune"):
            model = copy.deepcopy(base)
            for p in model.parameters():
                p.requires_grad_(True)
        elif name.startswith("train from scratch"):
            model = MLP()
        else:
            model = Adapted(base, {"input scale": lambda: StaticScales([0]),
                                   "scale per layer": lambda: StaticScales([0, 1, 2]),
                                   "per-sample styles": StyleNet}[name]())
        h = train(model, tr, va, epochs=epochs, lr=lr, batch_size=128, seed=seed, test_split=te)
        payload = count_params(model, trainable_only=True)
        if name == "per-sample styles" and seed == 0:
            with torch.no_grad():
                example_inputs[sh] = (te.x[:6], te.x[:6] * model.mod(te.x[:6])[0])
        return h, payload

    example_inputs = {}
    runs = run_seeds(keys, fit, args.seeds, grid, label=lambda k: f"{k[0]:10s} {k[1]}")
    acc = {k: r.test_acc for k, r in runs.items()}
    nparams = {m: runs[(sh, m)].payloads[0] for sh, m in keys}
    clean = [bases[s][1].test_acc for s in sorted(bases)]

    print(f"\nbase MLP ({count_params(MLP())} parameters) on the clean test split: {fmt(clean)}")
    lr = lambda k: "" if runs[k].lr is None else f" (lr {runs[k].lr:g})"  # noqa: E731
    rows = [[name, nparams[name]] + [fmt(acc[(sh, name)]) + lr((sh, name)) for sh in shifts] for name in methods]
    print(table(rows, ["method (MLP weights frozen unless noted)", "trainable parameters",
                       *[f"{sh}: test acc, {args.seeds} seeds (learning rate)" for sh in shifts]]))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.4))
    grouped_bars(ax, {f"{name} ({nparams[name]})": [acc[(sh, name)] for sh in shifts] for name in methods},
                 list(shifts), hline=(mean_std(clean)[0], "base MLP on clean digits"))
    ax.set(ylabel="test accuracy", ylim=(0, 1), title=f"frozen MLP on shifted digits (mean ± std, {args.seeds} seeds)")
    fig.tight_layout()
    savefig(fig, args, "input_modulation_acc.png")

    fig, axes = plt.subplots(2 * len(example_inputs), 6, figsize=(6, 2.2 * len(example_inputs)), squeeze=False)
    for r, (sh, (xs, xm)) in enumerate(example_inputs.items()):
        for c in range(6):
            for rr, img, lab in ((2 * r, xs[c], f"{sh}"), (2 * r + 1, xm[c], "x * s(x)")):
                ax = axes[rr, c]
                ax.imshow(img.view(8, 8).numpy(), cmap="gray_r")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(lab, fontsize=7)
    fig.suptitle("shifted inputs and the first layer's modulated input (per-sample styles, seed 0)", fontsize=8)
    fig.tight_layout()
    savefig(fig, args, "input_modulation_inputs.png")

    m = {k: mean_std(v)[0] for k, v in acc.items()}
    metrics = {"max_diff": diff, "clean_acc": mean_std(clean)[0]}
    for sh in shifts:
        key = sh.split()[0]
        metrics[f"{key}_before"] = m[(sh, "no adaptation")]
        metrics[f"{key}_input_scale"] = m[(sh, "input scale")]
        metrics[f"{key}_layer_scales"] = m[(sh, "scale per layer")]
        metrics[f"{key}_styles"] = m[(sh, "per-sample styles")]
        metrics[f"{key}_finetune"] = m[(sh, "fine-tune all weights (reference)")]
        metrics[f"{key}_scratch"] = m[(sh, "train from scratch (reference)")]
    finish(args, "input_modulation", **metrics, seeds=args.seeds)


if __name__ == "__main__":
    main()
