"""convert / condition / freeze_base / set_backend: a converted model computes what the
pretrained one did, the report says what changed, bad input is refused by name."""
import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import modweights
from modweights import nn as MN
from modweights.convert import (LAYER_TYPES, ConvertedMixtureConv2d, ConvertedMixtureLinear,
                                ConvertedModulatedConv2d, ConvertedModulatedLinear)


class Net(nn.Module):
    """Linear on (B, T, I), (B, H, W, I) and (B, I) inputs; convs with stride, dilation, groups,
    no bias, 'same' padding with an even kernel and every padding mode."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.same = nn.Conv2d(6, 6, 4, padding="same", bias=False)
        self.reflect = nn.Conv2d(6, 6, 3, padding=(1, 2), dilation=(1, 2), padding_mode="reflect")
        self.circ = nn.Conv2d(6, 4, 3, padding=1, padding_mode="circular")
        self.rep = nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate", groups=2)
        self.tok = nn.Linear(4, 5)
        self.pix = nn.Linear(5, 3, bias=False)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # x (B, 3, 9, 9)
        h = self.rep(self.circ(self.reflect(torch.relu(self.same(torch.relu(self.stem(x)))))))
        h = self.tok(h.flatten(2).transpose(1, 2))  # (B, T, 5)
        h = self.pix(h.unflatten(1, (5, 5)))  # (B, 5, 5, 3): 4-D input to a linear
        return self.head(h.mean((1, 2)))  # (B, 2)


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    return Net().to(dtype)


VARIANTS = {
    "mixture": dict(to="mixture", num_experts=3),
    "mixture-latent": dict(to="mixture", num_experts=2, style_features=4),
    "modulated": dict(to="modulated", style_features=4),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_model_computes_the_same(variant):
    net = _net()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    before = net(x)
    report = modweights.convert(net, **VARIANTS[variant])
    w = torch.randn(2, 4, dtype=torch.float64)
    with modweights.condition(net, w) if "style_features" in VARIANTS[variant] else contextlib.nullcontext():
        after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    # modulation needs groups == 1: the grouped conv is reported as skipped, not converted
    grouped = variant == "modulated"
    assert ("rep" not in report.names) == grouped
    assert any(n == "rep" and "groups=2" in why for n, _, why in report.skipped) == grouped
    assert len(report) == 8 - grouped


def test_report_and_parameter_counts():
    net = _net()
    report = modweights.convert(net, "mixture", num_experts=3, include=["tok", nn.Conv2d], exclude=["circ"])
    assert report.names == ["stem", "same", "reflect", "rep", "tok"]
    tok = next(r for r in report.replaced if r.name == "tok")
    assert (tok.old_type, tok.new_type) == ("Linear", "ConvertedMixtureLinear")
    # K copies of weight and bias, plus the router (I -> K)
    assert (tok.old_params, tok.new_params) == (4 * 5 + 5, 3 * (4 * 5 + 5) + 4 * 3 + 3)
    assert report.new_params == sum(r.new_params for r in report.replaced)
    assert type(net.circ) is nn.Conv2d and type(net.head) is nn.Linear
    assert isinstance(net.rep, ConvertedMixtureConv2d) and net.rep.groups == 2
    assert "tok" in str(report) and "ConvertedMixtureConv2d" in str(report)


def test_layers_carry_geometry_weights_and_flags():
    net = _net(torch.float32)
    net.head.weight.requires_grad_(False)
    ref = copy.deepcopy(net)
    modweights.convert(net, "mixture", num_experts=2, backend="torch")
    assert net.stem.stride == (2, 2) and net.stem.padding == (1, 1)
    assert net.reflect.dilation == (1, 2) and net.reflect._mw_pad_mode == "reflect"
    assert net.same.bias is None and net.same._mw_pre_pad == (1, 2, 1, 2)  # 'same', kernel 4
    for k in range(2):
        assert torch.equal(net.tok.weight[k], ref.tok.weight) and torch.equal(net.tok.bias[k], ref.tok.bias)
    assert net.tok.router.routing == "softmax" and net.tok.backend == "torch"
    assert not net.head.weight.requires_grad and net.tok.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_dtype_kept(dtype):
    net = _net(dtype)
    modweights.convert(net, "modulated", style_features=3)
    assert {p.dtype for p in net.parameters()} == {dtype}
    assert {p.device for p in net.parameters()} == {torch.device("cpu")}


def test_unbatched_and_1d_inputs_like_torch():
    conv, lin = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Linear(3, 2)
    m = nn.ModuleDict({"conv": conv, "lin": lin})
    x, v = torch.randn(3, 6, 6), torch.randn(3)
    yc, yl = conv(x), lin(v)
    modweights.convert(m, "mixture", num_experts=2)
    torch.testing.assert_close(m["conv"](x), yc)
    torch.testing.assert_close(m["lin"](v), yl)


def test_shared_module_replaced_everywhere_and_tied_weights_skipped():
    shared = nn.Linear(4, 4)
    emb = nn.Embedding(10, 4)
    out = nn.Linear(4, 10, bias=False)
    out.weight = emb.weight  # tied
    m = nn.ModuleDict({"a": shared, "b": shared, "emb": emb, "out": out})
    report = modweights.convert(m, "mixture", num_experts=2)
    assert m["a"] is m["b"] and isinstance(m["a"], ConvertedMixtureLinear)
    assert report.names == ["a"]
    assert any(n == "out" and "tied" in why for n, _, why in report.skipped)


def test_subclasses_and_attention_left_alone_unless_named():
    class MyLinear(nn.Linear):
        pass

    m = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True), "sub": MyLinear(8, 8),
                       "lin": nn.Linear(8, 8)})
    x = torch.randn(2, 5, 8)
    before = m["attn"](x, x, x)[0]
    report = modweights.convert(m, "mixture", num_experts=2)
    assert report.names == ["lin"]
    assert {n for n, _, _ in report.skipped} == {"attn.out_proj", "sub"}
    torch.testing.assert_close(m["attn"](x, x, x)[0], before)  # attention still works
    report = modweights.convert(m, "mixture", num_experts=2, include=[MyLinear])
    assert report.names == ["sub"] and isinstance(m["sub"], ConvertedMixtureLinear)
    # out_proj named on purpose: refused, saying why
    with pytest.raises(ValueError, match=r"matched no .*\(it names attn.out_proj, inside an nn.MultiheadAttention"):
        modweights.convert(m, "mixture", include=["attn.*"])


@pytest.mark.parametrize("stack", [False, True], ids=["layer", "encoder"])
@pytest.mark.parametrize("to", ["mixture", "modulated"])
def test_transformer_encoder_fast_path_stands_aside(to, stack):
    """In eval mode under no_grad, nn.TransformerEncoderLayer would hand linear1/linear2's
    weights to a fused kernel (styles ignored, a bank refused) and nn.TransformerEncoder would
    pass nested tensors on: after convert both run the modules, so no_grad gives what the
    same eval-mode call with autograd on (which never takes those paths) gives."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True) if stack else nn.Sequential(layer)
    kw = dict(style_features=3) if to == "modulated" else dict(num_experts=2)
    report = modweights.convert(model, to, **kw)
    assert any("fast path" in n for n in report.notes) and "note:" in str(report)
    assert stack == any("nested-tensor" in n for n in report.notes)
    for m in model.modules():
        if isinstance(m, ConvertedModulatedLinear):
            nn.init.normal_(m.affine.weight)  # styles that depend on the latent
    model.eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # sample 1 padded after 3 tokens
    kwargs = dict(src_key_padding_mask=mask) if stack else {}
    latents = [torch.randn(2, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    outs = []
    for w in latents if to == "modulated" else [None]:
        with modweights.condition(model, w) if w is not None else contextlib.nullcontext():
            slow = model(x, **kwargs)
            with torch.no_grad():
                fast = model(x, **kwargs)
        assert not fast.is_nested
        torch.testing.assert_close(fast, slow.detach())
        outs.append(fast)
    if to == "modulated":  # the styles reach the output
        assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_transformer_decoder_layer_converts():
    """nn.TransformerDecoderLayer calls its linears (no fused path): eval under no_grad is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)).eval()
    x, mem = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    with torch.no_grad():
        before = model[0](x, mem)
        report = modweights.convert(model, "mixture", num_experts=2)
        assert report.names == ["0.linear1", "0.linear2"] and not report.notes
        torch.testing.assert_close(model[0](x, mem), before, rtol=1e-5, atol=1e-5)


def test_layers_of_ours_are_not_converted_again():
    net = _net()
    modweights.convert(net, "mixture", num_experts=2)
    # the routers' nn.Linear are not candidates, and the error says the model was converted
    with pytest.raises(ValueError, match=r"no nn.Linear / nn.Conv1d / nn.Conv2d module to convert(.|\n)*already holds 8 "
                                         r"modweights layer\(s\) \(converted before\?\)"):
        modweights.convert(net, "mixture")


def test_hooks_move_to_the_converted_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    seen = []
    h_fwd = model[0].register_forward_hook(lambda m, i, o: seen.append(("fwd", type(m).__name__, o.shape)))
    model[0].register_forward_pre_hook(lambda m, i: seen.append(("pre", type(m).__name__, i[0].shape)))
    model[2].register_full_backward_hook(lambda m, gi, go: seen.append(("bwd", type(m).__name__, go[0].shape)))
    model[2].register_forward_hook(lambda m, args, kwargs, o: o * 2, with_kwargs=True)  # changes the output
    x = torch.randn(5, 4)
    before = model(x)
    seen.clear()
    report = modweights.convert(model, "mixture", num_experts=2)
    after = model(x)
    torch.testing.assert_close(after, before)  # the output-changing hook still applies
    after.sum().backward()
    assert seen == [("pre", "ConvertedMixtureLinear", (5, 4)), ("fwd", "ConvertedMixtureLinear", (5, 3)),
                    ("bwd", "ConvertedMixtureLinear", (5, 2))]
    assert any(n.startswith("0: 2 forward/backward hook(s) carried over") for n in report.notes)
    h_fwd.remove()  # the user's handle still removes it from the converted module
    seen.clear()
    model(x)
    assert [s[0] for s in seen] == ["pre"]


def test_state_dict_hooks_are_not_carried_and_say_so():
    model = nn.Sequential(nn.Linear(4, 3))
    model[0]._register_state_dict_hook(lambda m, sd, prefix, local: None)
    with pytest.warns(UserWarning, match=r"0 has state-dict hooks \(_state_dict_hooks\); they are not carried"):
        modweights.convert(model, "mixture", num_experts=2)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated")
@pytest.mark.parametrize("how", ["spectral_norm", "weight_norm", "prune", "parametrizations.spectral_norm"])
def test_recomputed_weights_are_skipped_with_the_reason(how):
    """Old-style spectral_norm / weight_norm / prune recompute `weight` in a forward pre-hook
    from other parameters; copying it would freeze it: skipped (and named), never frozen."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    if how == "spectral_norm":
        lin = nn.utils.spectral_norm(lin)
    elif how == "weight_norm":
        lin = torch.nn.utils.weight_norm(lin)
    elif how == "prune":
        prune.l1_unstructured(lin, "weight", amount=0.5)
    else:
        lin = nn.utils.parametrizations.spectral_norm(lin)
    model = nn.Sequential(lin, nn.Linear(3, 2))
    report = modweights.convert(model, "mixture", num_experts=2)
    assert report.names == ["1"] and model[0] is lin
    (name, _, why), = report.skipped
    assert name == "0"
    if how == "parametrizations.spectral_norm":  # a ParametrizedLinear: another type
        assert "subclass" in why
        with pytest.raises(ValueError, match="parametrized"):
            modweights.convert(model, "mixture", include=[type(lin)])
    else:
        assert "computed before each call" in why and "would freeze it" in why
        with pytest.raises(ValueError, match="computed before each call"):
            modweights.convert(nn.Sequential(lin), "mixture")




def test_timm_vit_converts_exactly():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                          num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    before = m(x)
    report = modweights.convert(m, "mixture", num_experts=2, exclude=["head"])
    assert "blocks.0.attn.qkv" in report.names and "patch_embed.proj" in report.names
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(to="dense"), ValueError, "`to` must be one of"),
    (dict(num_experts=0), ValueError, "`num_experts` must be a positive int"),
    (dict(to="modulated"), ValueError, "needs `style_features`"),
    (dict(to="modulated", style_features=-1), ValueError, "`style_features` must be a positive int"),
    (dict(backend="fast"), ValueError, "unknown modweights backend 'fast'"),
    (dict(include=["nothing.*"]), ValueError, "matched no nn.Linear / nn.Conv1d / nn.Conv2d module: 'nothing.*'"),
    (dict(include=[nn.ReLU]), ValueError, "not an nn.Linear, nn.Conv1d or nn.Conv2d"),
    (dict(include=[3]), TypeError, "must be name patterns"),
    (dict(exclude=["*"]), ValueError, "no nn.Linear / nn.Conv1d / nn.Conv2d module to convert"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        modweights.convert(_net(), **kwargs)


def test_model_itself_a_linear_is_refused():
    with pytest.raises(ValueError, match="wrap it"):
        modweights.convert(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="must be an nn.Module"):
        modweights.convert(lambda x: x)


# ----------------------------------------------------------------------------- condition


def test_condition_supplies_the_latent_and_gradients_reach_it():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    modweights.convert(m, "modulated", style_features=4)
    for layer in (m[0], m[2]):
        nn.init.normal_(layer.affine.weight)  # a latent that matters
    x, w = torch.randn(2, 7, 5), torch.randn(2, 4, requires_grad=True)
    with modweights.condition(m, w) as same:
        assert same is m
        y = m(x)
    y.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert m[0].affine.weight.grad.abs().sum() > 0
    # the same as passing the latent explicitly
    torch.testing.assert_close(m[2](torch.tanh(m[0](x, w)), w), y)
    assert m[0]._mw_latent is None  # cleared on exit
    n_params = len(list(m.parameters()))
    with modweights.condition(m, nn.Parameter(torch.randn(2, 4))):  # a learned latent stays the caller's
        m(x)
        assert len(list(m.parameters())) == n_params


def test_condition_nests_and_restores():
    m = nn.Sequential(nn.Linear(3, 3))
    modweights.convert(m, "modulated", style_features=2)
    nn.init.normal_(m[0].affine.weight)
    x, w1, w2 = torch.randn(2, 3), torch.randn(2, 2), torch.randn(2, 2)
    with modweights.condition(m, w1):
        y1 = m(x)
        with modweights.condition(m, w2):
            y2 = m(x)
        torch.testing.assert_close(m(x), y1)
    assert not torch.allclose(y1, y2)


def test_no_latent_is_an_error_naming_the_layer():
    m = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 2)))
    modweights.convert(m, "modulated", style_features=2)
    with pytest.raises(RuntimeError, match=r"ConvertedModulatedLinear '0' reads a latent .*modweights.condition"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"`w` must have shape \(B, 2\) for layer '0'"):
        with modweights.condition(m, torch.randn(2, 5)):
            pass
    with pytest.raises(TypeError, match="floating-point"):
        with modweights.condition(m, torch.ones(2, 2, dtype=torch.long)):
            pass
    plain = nn.Sequential(nn.Linear(3, 3))
    modweights.convert(plain, "mixture")  # routes on the input: reads no latent
    with pytest.raises(ValueError, match="has no layer that reads a latent"):
        with modweights.condition(plain, torch.randn(2, 2)):
            pass


# ----------------------------------------------------------------------------- fine-tuning helpers


def test_freeze_base_and_modulation_parameters():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.LayerNorm(3))
    modweights.convert(m, "mixture", num_experts=3, include=["0"])
    m.add_module("mod", MN.ModulatedLinear(3, 3, 2))
    with pytest.warns(UserWarning, match="experts of 0 are all equal"):
        names = modweights.freeze_base(m)
    assert sorted(names) == ["0.router.fc.bias", "0.router.fc.weight", "mod.affine.bias", "mod.affine.weight"]
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(names)
    assert len(modweights.modulation_parameters(m)) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = modweights.freeze_base(m, train_experts=True)
    assert {"0.weight", "0.bias"} <= set(names) and "2.weight" not in names and "mod.weight" not in names
    assert len(modweights.modulation_parameters(m, experts=True)) == 6


def test_fine_tuning_a_converted_mixture_separates_the_experts():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    modweights.convert(m, "mixture", num_experts=3)
    modweights.freeze_base(m, train_experts=True)
    opt = torch.optim.Adam(modweights.modulation_parameters(m, experts=True), lr=1e-2)
    x, t = torch.randn(16, 6), torch.randn(16, 2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (m(x) - t).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.allclose(m[0].weight[0], m[0].weight[1])  # routing broke the symmetry


def test_set_backend():
    net = _net()
    modweights.convert(net, "mixture", num_experts=2)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    assert modweights.set_backend(net, "reference") == 8
    assert {m.backend for m in net.modules() if isinstance(m, LAYER_TYPES)} == {"reference"}
    y_ref = net(x)
    modweights.set_backend(net, "torch")
    torch.testing.assert_close(net(x), y_ref)
    modweights.set_backend(net, None)
    with pytest.raises(ValueError, match="unknown modweights backend 'fast'"):
        modweights.set_backend(net, "fast")
    with pytest.raises(ValueError, match="contains no modweights layer"):
        modweights.set_backend(nn.Linear(2, 2), "torch")


def test_converted_types():
    m = nn.ModuleDict({"l": nn.Linear(3, 3), "c": nn.Conv2d(3, 3, 1)})
    modweights.convert(m, "modulated", style_features=2)
    assert isinstance(m["l"], ConvertedModulatedLinear) and isinstance(m["l"], MN.ModulatedLinear)
    assert isinstance(m["c"], ConvertedModulatedConv2d) and isinstance(m["c"], MN.ModulatedConv2d)
