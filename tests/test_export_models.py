"""Real models with modweights layers exported to ONNX (dynamo exporter, dynamic batch and
sequence length) and run in onnxruntime at sizes other than the traced ones: a timm CondConv
EfficientNet with its CondConv swapped for ours, a StyleGAN2-style synthesis block on
``compat.stylegan2``, and a tiny Llama converted to mixtures.
"""
import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

import modweights

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

RTOL = 1e-5


def _onnx_parity(model, args, dynamic_shapes, new_inputs, path, rtol=RTOL, dynamo=True):
    """Export ``model`` (dynamo exporter; or the TorchScript one with the batch of every input
    and output dynamic), run the ONNX graph in onnxruntime on each of ``new_inputs`` and compare
    with eager; returns the largest relative error."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes).save(str(path))
        else:
            names = [f"in{i}" for i in range(len(args))]
            torch.onnx.export(model, args, str(path), dynamo=False, input_names=names, output_names=["y"],
                              dynamic_axes={n: {0: "B"} for n in names + ["y"]})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert len(names) == len(args)
    worst = 0.0
    for inputs in new_inputs:
        out = torch.from_numpy(sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])
        with torch.no_grad():
            ref = model(*inputs)
        assert out.shape == ref.shape
        worst = max(worst, float((out - ref).abs().max() / ref.abs().max()))
    assert worst <= rtol, worst
    return worst


def _perturb(module, scale=0.05, seed=0):
    """Make the experts differ (converted layers start with K copies of one weight)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean().clamp_min(1e-3))


def test_timm_condconv_efficientnet_onnx_dynamic_batch(tmp_path):
    timm = pytest.importorskip("timm")
    from modweights.compat.timm import swap_condconv

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_cc_b0_4e", pretrained=False, num_classes=10)
    assert swap_condconv(model) > 0
    _perturb(model)
    x = torch.randn(2, 3, 64, 64)
    new = [(torch.randn(B, 3, 64, 64),) for B in (1, 5)]
    # BatchNorm in eval, deep network: errors accumulate over ~80 layers (still float32-exact scale)
    _onnx_parity(model, (x,), ({0: Dim.AUTO},), new, tmp_path / "cc.onnx", rtol=1e-4)


class SynthesisBlock(nn.Module):
    """A StyleGAN2 synthesis block (StyleGAN2-ADA's layout): up-sampling modulated 3x3 conv,
    noise, a 3x3 modulated conv, a 1x1 toRGB without demodulation, on ``compat.stylegan2``."""

    def __init__(self, cin=8, cout=6, w_dim=5):
        super().__init__()
        from modweights.compat.stylegan2 import setup_filter
        self.aff0, self.aff1, self.aff2 = nn.Linear(w_dim, cin), nn.Linear(w_dim, cout), nn.Linear(w_dim, cout)
        self.w0 = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.w1 = nn.Parameter(torch.randn(cout, cout, 3, 3))
        self.wrgb = nn.Parameter(torch.randn(3, cout, 1, 1))
        self.noise_strength = nn.Parameter(torch.tensor(0.1))
        self.register_buffer("f", setup_filter([1, 3, 3, 1]))

    def forward(self, x, w, noise):
        from modweights.compat.stylegan2 import modulated_conv2d as mc
        x = mc(x, self.w0, self.aff0(w), noise=noise * self.noise_strength, up=2, padding=1,
               resample_filter=self.f, flip_weight=False)
        x = torch.nn.functional.leaky_relu(x, 0.2)
        x = torch.nn.functional.leaky_relu(mc(x, self.w1, self.aff1(w), padding=1, resample_filter=self.f), 0.2)
        return mc(x, self.wrgb, self.aff2(w), demodulate=False)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_stylegan2_synthesis_block_onnx_dynamic_batch(tmp_path, dynamo):
    """Both exporters; the TorchScript one traces compat.stylegan2's paddings, phase sizes and
    filter expand from the image and channel sizes, which it fixes at export (ints), and keeps
    the batch dynamic."""
    torch.manual_seed(0)
    block = SynthesisBlock()

    def inputs(B):
        return (torch.randn(B, 8, 4, 4), torch.randn(B, 5), torch.randn(B, 1, 8, 8))

    B = Dim.AUTO
    _onnx_parity(block, inputs(2), ({0: B}, {0: B}, {0: B}), [inputs(1), inputs(5)], tmp_path / "sg.onnx",
                 dynamo=dynamo)


class _Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, use_cache=False).logits


def test_converted_llama_onnx_dynamic_batch_and_length(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    report = modweights.convert(lm, "mixture", num_experts=4, include=["*mlp*", "*self_attn.o_proj"])
    assert len(report.replaced) >= 6
    _perturb(lm)
    model = _Logits(lm)
    ids = torch.randint(0, 64, (2, 7))
    new = [(torch.randint(0, 64, (B, T)),) for B, T in ((1, 3), (4, 12))]
    _onnx_parity(model, (ids,), ({0: Dim.AUTO, 1: Dim.AUTO},), new, tmp_path / "lm.onnx")
