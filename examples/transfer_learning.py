"""Transfer learning with little data: feature extraction, fine-tuning, and training only a modulation.

An MLP body 64 -> 64 -> 64 (ReLU) with a 5-way head is pretrained on digits 0-4. It is then
transferred to digits 5-9 with only a few labelled examples per class (the validation set used
for early stopping and for choosing the learning rate is just as small), by:

(a) feature extraction: the body frozen, a new head trained;
(b) full fine-tuning: body and new head trained;
(c) modulation only: ``modweights.convert(net, to="modulated", ...)`` turns the body's
    ``nn.Linear`` layers into ``ModulatedLinear`` layers holding the pretrained weights, without
    demodulation, whose styles (one scale per input channel, ``affine(w)``) start at exactly 1,
    so the network starts as the pretrained one; ``modweights.freeze_base`` leaves only the
    style affines trainable (plus the new head). The latent ``w`` is given with
    ``modweights.condition``:
    (c)  ``per task``: ``w = 1`` for every sample, so each layer learns one style vector (IA3-like);
    (c') ``per sample``: ``w`` = the image average-pooled to 4x4, so each sample gets its own styles;
(d) for reference, the same network trained from scratch on the few examples.

Prints test accuracy (all test images of digits 5-9) and trainable-parameter counts over seeds;
each seed pretrains its own body and draws its own few examples.

    python examples/transfer_learning.py [--quick] [--seeds N] [--out DIR]
"""
from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import nn

import modweights
from _common import (PerSeed, count_params, finish, fmt, grouped_bars, load_digits_split, mean_std, parse_args,
                     pyplot, run_seeds, savefig, seed_all, select_classes, table, train)

HIDDEN = 64
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


class Net(nn.Module):
    """``body`` (ReLU after each layer) and ``head``. ``latent(x)``, when set, is the ``w`` that
    :func:`modweights.condition` hands to the converted (modulated) layers."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, num_classes)
        self.latent = None

    def forward(self, x):
        if self.latent is None:
            return self.head(self.body(x))
        with modweights.condition(self, self.latent(x)):
            return self.head(self.body(x))


def constant_latent(x):
    """``w = 1`` for every sample: each layer's styles are one learned vector."""
    return x.new_ones(x.shape[0], 1)


def pooled_latent(x):
    """``w`` = the image average-pooled to 4x4 (16 numbers per sample)."""
    return F.avg_pool2d(x.view(-1, 1, 8, 8), 2).flatten(1)


def with_new_head(pre: Net) -> Net:
    net = copy.deepcopy(pre)
    net.head = nn.Linear(HIDDEN, len(TARGET))
    return net


def feature_extraction(pre):
    net = with_new_head(pre)
    for p in net.body.parameters():
        p.requires_grad_(False)
    return net


def fine_tuning(pre):
    return with_new_head(pre)


def modulation(latent, style_features):
    def make(pre):
        net = with_new_head(pre)
        modweights.convert(net, to="modulated", style_features=style_features, include=["body.*"])
        modweights.freeze_base(net)  # only the style affines stay trainable ...
        for p in net.head.parameters():  # ... and the new head
            p.requires_grad_(True)
        net.latent = latent
        return net
    return make


def from_scratch(pre):
    return Net(len(TARGET))


METHODS = {
    "(a) feature extraction": feature_extraction,
    "(b) full fine-tuning": fine_tuning,
    "(c) modulation only, per task": modulation(constant_latent, 1),
    "(c') modulation only, per sample": modulation(pooled_latent, 16),
    "(d) from scratch (reference)": from_scratch,
}


def main():
    args = parse_args(__doc__.splitlines()[0], seeds=5)
    data = load_digits_split()
    shots = (5,) if args.quick else (5, 20)
    pre_epochs, epochs = (3, 5) if args.quick else (30, 100)
    grid = (3e-3,) if args.quick else LR_GRID
    src = [select_classes(s, SOURCE) for s in (data.train, data.val, data.test)]
    test = select_classes(data.test, TARGET)
    print(f"load_digits, {data.sizes()}. Pretraining on digits 0-4: train {len(src[0])} / val {len(src[1])}, "
          f"{pre_epochs} epochs, Adam lr 3e-3. Transfer to digits 5-9 with {' or '.join(map(str, shots))} labelled "
          f"examples per class for training and as many for validation (drawn per seed from the train / val "
          f"splits); test: all {len(test)} test images of digits 5-9. {epochs} epochs, Adam, batch 64, learning "
          f"rate per method from {grid} by validation accuracy on seed 0, weights of the best validation epoch. "
          f"{args.seeds} seeds.")

    def pretrain(seed):
        seed_all(seed)
        pre = Net(len(SOURCE))
        h = train(pre, src[0], src[1], epochs=pre_epochs, lr=3e-3, seed=seed, test_split=src[2])
        print(f"  seed {seed}: pretrained on digits 0-4, test acc {h.test_acc:.4f}", flush=True)
        return pre, h

    pretrained = PerSeed(pretrain)  # seed -> (Net, History)

    def fit(key, seed, lr):
        name, k = key
        pre = pretrained[seed][0]
        tr = select_classes(data.train, TARGET, per_class=k, seed=1000 * seed + k)
        va = select_classes(data.val, TARGET, per_class=k, seed=1000 * seed + k + 1)
        seed_all(seed)
        net = METHODS[name](pre)
        h = train(net, tr, va, epochs=epochs, lr=lr, seed=seed, test_split=test)
        return h, count_params(net, trainable_only=True)

    keys = [(name, k) for k in shots for name in METHODS]
    runs = run_seeds(keys, fit, args.seeds, grid, label=lambda key: f"{key[1]:2d}-shot {key[0]}")
    acc = {key: r.test_acc for key, r in runs.items()}
    nparams = {name: runs[(name, shots[0])].payloads[0] for name in METHODS}
    src_acc = [pretrained[s][1].test_acc for s in sorted(pretrained)]

    print(f"\npretrained body + head on digits 0-4 (test, {len(src[2])} images): {fmt(src_acc)}")
    rows = [[name, nparams[name]] + [f"{fmt(acc[(name, k)])} (lr {runs[(name, k)].lr:g})" for k in shots]
            for name in METHODS]
    print(table(rows, ["method", "trainable parameters",
                       *[f"{k} per class: test acc, {args.seeds} seeds (learning rate)" for k in shots]]))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.4))
    grouped_bars(ax, {f"{name} ({nparams[name]})": [acc[(name, k)] for k in shots] for name in METHODS},
                 [f"{k} examples / class" for k in shots])
    ax.set(ylabel="test accuracy (digits 5-9)", ylim=(0, 1),
           title=f"pretrained on 0-4, transferred to 5-9 (mean ± std, {args.seeds} seeds)")
    fig.tight_layout()
    savefig(fig, args, "transfer_learning.png")

    k = shots[0]
    m = {key: mean_std(v)[0] for key, v in acc.items()}
    names = list(METHODS)
    finish(args, "transfer_learning", shots=k, feature_extraction_acc=m[(names[0], k)],
           finetune_acc=m[(names[1], k)], modulation_acc=m[(names[2], k)], modulation_sample_acc=m[(names[3], k)],
           scratch_acc=m[(names[4], k)], feature_extraction_params=nparams[names[0]],
           finetune_params=nparams[names[1]], modulation_params=nparams[names[2]],
           modulation_sample_params=nparams[names[3]], seeds=args.seeds)


if __name__ == "__main__":
    main()
