"""A CondConv CNN: ``MixtureConv2d`` layers on scikit-learn's bundled 8x8 digits, trained briefly.

Each ``MixtureConv2d`` holds ``K`` filter banks; its router reads the pooled input of each image
and mixes the banks into that image's filters (CondConv, Yang et al. 2019), without forming a
per-image filter where it need not. The network trains for a few epochs on CPU and prints its
test accuracy and how differently the images use the experts (the routing coefficients'
spread: 0 would mean every image gets the same filters).

    python examples/condconv_cnn.py [--epochs 15]
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from modweights.nn import MixtureConv2d


class CondConvNet(nn.Module):
    def __init__(self, experts=4):
        super().__init__()
        # routing and bias given explicitly: the same layer whatever the defaults
        self.conv1 = MixtureConv2d(1, 16, 3, experts, padding=1, routing="softmax", bias=True)
        self.conv2 = MixtureConv2d(16, 32, 3, experts, padding=1, routing="softmax", bias=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))  # no routing argument: the layer's router reads the pooled input
        x = F.max_pool2d(x, 2)  # 8x8 -> 4x4
        x = F.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target)
    i_train, i_test = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=digits.target)
    i_train, i_test = torch.tensor(i_train), torch.tensor(i_test)
    net = CondConvNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for epoch in range(args.epochs):
        perm = i_train[torch.randperm(len(i_train))]
        for batch in perm.split(64):
            loss = F.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % max(args.epochs // 5, 1) == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d}  training loss {loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        acc = (net(x[i_test]).argmax(1) == y[i_test]).float().mean().item()
        coeffs = net.conv2.coefficients(F.max_pool2d(F.relu(net.conv1(x[i_test])), 2))  # (N, K) per image
    spread = coeffs.std(0).mean().item()
    print(f"test accuracy {acc:.3f} on {len(i_test)} images; routing coefficients vary across images by "
          f"{spread:.3f} (std per expert), mean use per expert {[round(v, 2) for v in coeffs.mean(0).tolist()]}")
    print(f"RESULT condconv_cnn test_acc={acc:.4f} coeff_spread={spread:.4f}")


if __name__ == "__main__":
    main()
