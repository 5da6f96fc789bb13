"""A small StyleGAN2-style generator built from ``ModulatedConv2d``, trained a few steps on CPU.

A mapping network turns a latent ``z`` into a style vector ``w``; every synthesis block is
up-sampling and two modulated 3x3 convolutions whose filters are scaled per sample by ``w``
and demodulated (StyleGAN2's weight demodulation, never forming a per-sample filter). The
generator learns to reproduce 8 fixed 16x16 target images from 8 fixed latents (a
reconstruction loss: small enough to train in seconds, and it shows the layers learn). It
prints the loss falling and that two latents give two different images.

For a full StyleGAN2 port (equalised learning rate, noise, the FIR up/down-sampling filters of
StyleGAN2-ADA), use ``modweights.compat.stylegan2.modulated_conv2d``, a drop-in for their
function; ``ModulatedConv2d`` is the plain layer.

    python examples/stylegan2_generator.py [--steps 200]
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

from modweights.nn import ModulatedConv2d


class Block(nn.Module):
    """Up-sample x2, then two modulated convolutions, each with a leaky ReLU."""

    def __init__(self, cin, cout, w_dim):
        super().__init__()
        self.conv1 = ModulatedConv2d(cin, cout, 3, w_dim, padding=1)
        self.conv2 = ModulatedConv2d(cout, cout, 3, w_dim, padding=1)

    def forward(self, x, w):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.leaky_relu(self.conv1(x, w), 0.2)
        return F.leaky_relu(self.conv2(x, w), 0.2)


class Generator(nn.Module):
    def __init__(self, z_dim=32, w_dim=32, ch=32):
        super().__init__()
        self.mapping = nn.Sequential(nn.Linear(z_dim, w_dim), nn.LeakyReLU(0.2), nn.Linear(w_dim, w_dim))
        self.const = nn.Parameter(torch.randn(1, ch, 4, 4))
        self.blocks = nn.ModuleList([Block(ch, ch, w_dim), Block(ch, ch // 2, w_dim)])  # 4 -> 8 -> 16
        self.to_rgb = ModulatedConv2d(ch // 2, 3, 1, w_dim, demodulate=False)  # as StyleGAN2's toRGB

    def forward(self, z):
        w = self.mapping(z)
        x = self.const.expand(z.shape[0], -1, -1, -1)
        for block in self.blocks:
            x = block(x, w)
        return torch.tanh(self.to_rgb(x, w))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    g = Generator()
    z = torch.randn(8, 32)
    target = torch.rand(8, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(g.parameters(), lr=2e-3)
    losses = []
    for step in range(args.steps):
        loss = F.mse_loss(g(z), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(args.steps // 5, 1) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  reconstruction loss {loss.item():.4f}")
    with torch.no_grad():
        imgs = g(z)
    diff = (imgs[0] - imgs[1]).abs().mean().item()
    print(f"images {tuple(imgs.shape)}; two latents differ by {diff:.3f} per pixel (the styles modulate the filters)")
    print(f"RESULT stylegan2_generator first_loss={losses[0]:.4f} last_loss={losses[-1]:.4f} latent_diff={diff:.4f}")


if __name__ == "__main__":
    main()
