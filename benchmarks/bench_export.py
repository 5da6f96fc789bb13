"""Deployment benchmark: onnxruntime CPU latency of our exported CondConv and modulated-conv
blocks against the peers' exported graphs, at the peers' traced batch (the only batch at which
their graphs run: a grouped conv whose group count is that batch).

    PYTHONPATH=. python benchmarks/bench_export.py [--batch 8] [--channels 64] [--size 32] [--runs 30]

Peers, written as they do it: timm's ``CondConv2d`` (per-sample filters ``routing_weights @
weight``, one conv with ``groups = B``), and StyleGAN2's fused modulated convolution (per-sample
weights ``W * s``, demodulated, one conv with ``groups = B``). Ours: the same layers through
modweights (``compat.timm.TimmCondConv2d`` sharing timm's parameters; ``nn.ModulatedConv2d``
with the peer's weight), exported with a dynamic batch through the dynamo exporter; the peers
through the TorchScript exporter (``dynamo=False``), as their users do. fp32, onnxruntime's
CPU provider.
Prints min and median milliseconds per call and the ratio peer / ours (> 1: ours is faster),
and checks that both graphs compute the same output.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import modweights.nn as MN


class StyleGAN2FusedModConv(nn.Module):
    """StyleGAN2's fused modulated conv, as its reference code writes it: per-sample weights,
    demodulation, then one grouped conv over the batch (``groups = B``)."""

    def __init__(self, weight, affine):
        super().__init__()
        self.weight, self.affine = weight, affine

    def forward(self, x, w):
        B, I, H, W = x.shape
        s = self.affine(w)
        wt = self.weight[None] * s[:, None, :, None, None]  # [B, O, I, kh, kw]
        wt = wt * torch.rsqrt(wt.square().sum([2, 3, 4]) + 1e-8)[:, :, None, None, None]
        O = wt.shape[1]
        y = F.conv2d(x.reshape(1, B * I, H, W), wt.reshape(B * O, I, *wt.shape[3:]), padding=1, groups=B)
        return y.reshape(B, O, *y.shape[2:])


def _export(model, args, path, dynamic: bool):
    """Ours: the dynamo exporter with a dynamic batch. Peers: the TorchScript exporter (their
    graphs fix the batch whichever exporter runs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamic:
            torch.onnx.export(model.eval(), args, dynamo=True, verbose=False,
                              dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in args)).save(path)
        else:
            torch.onnx.export(model.eval(), args, path, dynamo=False)


def _time(path, args, runs, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    out = sess.run(None, feed)[0]
    for _ in range(3):
        sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append((time.perf_counter() - t0) * 1e3)
    return min(ts), statistics.median(ts), torch.from_numpy(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    from timm.layers import CondConv2d

    from modweights.compat.timm import TimmCondConv2d

    torch.manual_seed(0)
    B, C, S, K = a.batch, a.channels, a.size, a.experts
    x = torch.randn(B, C, S, S)
    cc = CondConv2d(C, C, 3, padding=1, num_experts=K)
    ours_cc = TimmCondConv2d.from_timm(cc)
    r = torch.softmax(torch.randn(B, K), -1)
    mod = MN.ModulatedConv2d(C, C, 3, 16, padding=1, bias=False)
    peer_mod = StyleGAN2FusedModConv(mod.weight, mod.affine)
    w = torch.randn(B, 16)
    blocks = [("CondConv (timm CondConv2d)", cc, ours_cc, (x, r)),
              ("modulated conv (StyleGAN2 fused)", peer_mod, mod, (x, w))]
    print(f"onnxruntime CPU, fp32, {a.threads} threads, B={B}, C_in=C_out={C}, {S}x{S}, 3x3, K={K}; "
          f"ms per call, min / median of {a.runs}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, peer, ours, args in blocks:
            pp, po = os.path.join(tmp, "peer.onnx"), os.path.join(tmp, "ours.onnx")
            _export(peer, args, pp, dynamic=False)
            _export(ours, args, po, dynamic=True)
            pmin, pmed, pout = _time(pp, args, a.runs, a.threads)
            omin, omed, oout = _time(po, args, a.runs, a.threads)
            err = float((pout - oout).abs().max() / pout.abs().max())
            print(f"{name:34s} peer {pmin:7.2f} / {pmed:7.2f}   ours {omin:7.2f} / {omed:7.2f}   "
                  f"peer/ours (median) {pmed / omed:5.2f}   rel diff {err:.1e}")


if __name__ == "__main__":
    main()
