"""Converted sequence models keep what their architecture promises once the experts differ (as
after fine-tuning): causal outputs read no later token, padding reaches no real token, samples
never meet, cached generation equals the full forward pass, a saved model loads back exactly,
and GPT-2's Conv1D converts with equal outputs. Tiny random-init models, CPU."""
import pytest
import torch
from torch import nn

import modweights
from modweights import functional as MF
from modweights import nn as MN
from modweights.convert import ConvertedMixtureLinear

CAUSAL = [("token", None), ("prefix_mean", None), ("segment", 3)]
ALL_INPUT_MODES = CAUSAL + [("noncausal_unpadded_mean", None)]


def _perturb(model, scale=0.3, seed=1):
    """Make the experts (and routers) differ, as fine-tuning would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MN.MixtureLinear):
                m.weight.add_(scale * torch.randn(m.weight.shape, generator=g) * m.weight.std())
                m.router.fc.weight.add_(torch.randn(m.router.fc.weight.shape, generator=g))
    return model


def _layer(mode, seg, **kw):
    torch.manual_seed(0)
    return _perturb(MN.MixtureLinear(6, 5, 3, routing_mode=mode, segment_length=seg, **kw).double())


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("mode,seg", ALL_INPUT_MODES, ids=[m for m, _ in ALL_INPUT_MODES])
def test_layer_causal_modes_read_no_later_token(mode, seg):
    layer = _layer(mode, seg)
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    y, y2 = layer(x), layer(x2)
    leak = (y[:, :5] - y2[:, :5]).abs().max().item()
    if mode == "noncausal_unpadded_mean":
        assert leak > 1e-3  # the test can fail: the token mean reads the future
    else:
        assert leak == 0.0


@pytest.mark.parametrize("T", [9, 8, 2], ids=["whole-segments", "partial-last", "one-partial"])
def test_segment_mixes_once_per_segment(T, monkeypatch):
    """Segment routing equals the per-token op with the expanded coefficients, and the weights
    are mixed once per (sample, segment): B * ceil(T / L) mixes, not B * T."""
    layer = _layer("segment", 3)
    x = torch.randn(2, T, 6, dtype=torch.float64)
    ref = MF.mixture_linear(x, layer.weight, layer.coefficients(x), bias=layer.bias)
    mixes = []
    real = MF.mixture_linear

    def counting(x, bank, coeffs, **kw):
        mixes.append(coeffs.shape[0] if coeffs.dim() == 2 else coeffs.shape[0] * coeffs.shape[1])
        return real(x, bank, coeffs, **kw)

    monkeypatch.setattr(MF, "mixture_linear", counting)
    y = layer(x)
    torch.testing.assert_close(y, ref)
    assert sum(mixes) == 2 * -(-T // 3)
    assert len(mixes) <= 2


def test_segment_first_segment_reads_no_token():
    layer = _layer("segment", 4)
    a = layer.coefficients(torch.randn(3, 6, 6, dtype=torch.float64))
    b = layer.coefficients(torch.randn(3, 6, 6, dtype=torch.float64))
    torch.testing.assert_close(a[:, :4], b[:, :4])  # router(0) for every sample
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("mode,seg", CAUSAL, ids=[m for m, _ in CAUSAL])
def test_layer_decoding_continues_the_sequence(mode, seg):
    """Inside decoding(), calls of 4, 1, 2, 1 tokens give what one call on all 8 gives."""
    layer = _layer(mode, seg)
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    full = layer(x)
    with MN.decoding(layer):
        parts = torch.cat([layer(x[:, a:b]) for a, b in [(0, 4), (4, 5), (5, 7), (7, 8)]], 1)
    torch.testing.assert_close(parts, full)
    if mode == "token":
        return
    # without the state each call is a new sequence
    assert not torch.allclose(torch.cat([layer(x[:, :4]), layer(x[:, 4:])], 1), full)
    with MN.decoding(layer):
        layer(x)
        with pytest.raises(ValueError, match="batch size changed"):
            layer(x[:1, :1])


def test_layer_cond_and_coeffs():
    layer = _layer("cond", None, routing_features=4)
    x, cond = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x, cond), layer(x, coeffs=layer.router(cond)))
    with pytest.raises(ValueError, match="needs `cond`"):
        layer(x)
    with pytest.raises(ValueError, match="not both"):
        layer(x, cond, coeffs=layer.router(cond))
    with pytest.raises(ValueError, match="routing_features=4 != in_features=6"):
        _layer("token", None, routing_features=4)(x)


def test_routing_mode_arguments():
    with pytest.warns(DeprecationWarning, match="per_token"):
        assert MN.MixtureLinear(4, 3, 2, per_token=True).routing_mode == "token"
    with pytest.warns(DeprecationWarning):
        assert MN.MixtureLinear(4, 3, 2, per_token=False).routing_mode == "noncausal_unpadded_mean"
    assert MN.MixtureLinear(4, 3, 2).routing_mode == "token"
    for kw, match in [(dict(routing_mode="mean"), "routing_mode"), (dict(routing_mode="segment"), "segment_length"),
                      (dict(routing_mode="token", segment_length=4), "segment_length"),
                      (dict(routing_mode="token", per_token=True), "only")]:
        with pytest.raises(ValueError, match=match):
            MN.MixtureLinear(4, 3, 2, **kw)


@pytest.mark.parametrize("per_token,mode", [(True, "token"), (False, "noncausal_unpadded_mean")])
def test_a_layer_pickled_with_per_token_keeps_its_routing(per_token, mode):
    layer = MN.MixtureLinear(4, 3, 2)
    state = dict(layer.__dict__)
    del state["routing_mode"], state["segment_length"]
    state["per_token"] = per_token  # what a layer pickled before routing_mode held
    old = MN.MixtureLinear.__new__(MN.MixtureLinear)
    old.__setstate__(state)
    assert old.routing_mode == mode and old.per_token == per_token
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(old(x), layer(x) if per_token else MF.mixture_linear(
        x, layer.weight, layer.router(x.mean(1)), bias=layer.bias))


@pytest.mark.parametrize("kwargs,match", [
    (dict(routing_mode="cond"), "go together"),
    (dict(routing_mode="token", style_features=4), "go together"),
    (dict(routing_mode="segment"), "segment_length"),
    (dict(segment_length=4), "segment_length"),
    (dict(routing_mode="per_sample"), "routing_mode"),
    (dict(to="modulated", style_features=4, routing_mode="token"), "to='mixture'"),
])
def test_convert_routing_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        modweights.convert(nn.Sequential(nn.Linear(4, 4)), **kwargs)


def test_masked_mean_ignores_padding():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(MN.masked_mean(x, mask), torch.stack([x[0, :3].mean(0), x[1].mean(0)]))
    with pytest.raises(ValueError, match="mask"):
        MN.masked_mean(x, mask[:, :4])


# ----------------------------------------------------------------------------- torch transformers


def _encoder(batch_first, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()


@pytest.mark.parametrize("mode,seg", ALL_INPUT_MODES, ids=[m for m, _ in ALL_INPUT_MODES])
def test_time_major_encoder_keeps_samples_apart(mode, seg):
    """batch_first=False: the converted linears take dimension 1 as the sample, so a model
    converted in either layout computes the same, and samples never meet."""
    models = {}
    for bf in (True, False):
        models[bf] = _encoder(bf)
        report = modweights.convert(models[bf], num_experts=3, routing_mode=mode, segment_length=seg)
        assert all(("time-major" in r.why) != bf for r in report.replaced)
        _perturb(models[bf])
    x = torch.randn(3, 7, 8, dtype=torch.float64)  # (B, T, E)
    y = models[True](x)
    torch.testing.assert_close(models[False](x.transpose(0, 1)).transpose(0, 1), y)
    x2 = x.clone()
    x2[1:] += 1.0
    torch.testing.assert_close(models[True](x2)[0], y[0])


def test_time_major_modulated_applies_each_latent_to_its_sample():
    model = _encoder(False)
    modweights.convert(model, "modulated", style_features=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MN.ModulatedLinear):
                m.affine.weight.normal_()
    x, w = torch.randn(5, 3, 8, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with modweights.condition(model, w):
        y = model(x)
    for b in range(3):
        with modweights.condition(model, w[b:b + 1]):
            torch.testing.assert_close(model(x[:, b:b + 1]), y[:, b:b + 1])


class _TimeMajorBlock(nn.Module):
    """A custom block: time-major attention, then an MLP on (T, B, E)."""

    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(8, 2), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


@pytest.mark.parametrize("how", ["token", "prefix_mean", "modulated"])
def test_time_major_attention_outside_transformer_layers_is_noted(how):
    kw = dict(to="modulated", style_features=4) if how == "modulated" else dict(routing_mode=how)
    report = modweights.convert(_TimeMajorBlock(), **kw)
    noted = [n for n in report.notes if "batch_first=False outside" in n]
    assert bool(noted) == (how != "token") and all(n.startswith("attn:") for n in noted)
    # the layers inside nn.Transformer* are handled, not noted
    assert not [n for n in modweights.convert(_encoder(False), **kw).notes if "outside" in n]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "time-major"])
@pytest.mark.parametrize("mode,seg", CAUSAL, ids=[m for m, _ in CAUSAL])
def test_causal_transformer_decoder_reads_no_later_token(mode, seg, batch_first):
    torch.manual_seed(0)
    model = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=batch_first).double().eval()
    modweights.convert(model, num_experts=3, routing_mode=mode, segment_length=seg)
    _perturb(model)
    src, tgt = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    tgt2 = tgt.clone()
    tgt2[:, 5:] += 1.0

    def run(t):
        if batch_first:
            return model(src, t, tgt_mask=mask, tgt_is_causal=True)
        return model(src.transpose(0, 1), t.transpose(0, 1), tgt_mask=mask, tgt_is_causal=True).transpose(0, 1)

    torch.testing.assert_close(run(tgt2)[:, :5], run(tgt)[:, :5], rtol=0, atol=0)


def test_padding_leaves_real_tokens_of_a_torch_encoder_unchanged():
    """Pooled routing through `cond`: a mask-aware pooled latent (masked_mean) and the
    padding mask keep the real tokens' outputs; the plain token mean would not."""
    model = _encoder(True)
    modweights.convert(model, num_experts=3, style_features=8)
    _perturb(model)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    pad = torch.cat([x, torch.randn(2, 3, 8, dtype=torch.float64)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3] * 2)
    with modweights.condition(model, MN.masked_mean(x)):
        y = model(x)
    with modweights.condition(model, MN.masked_mean(pad, mask)):
        y_pad = model(pad, src_key_padding_mask=mask == 0)
    torch.testing.assert_close(y_pad[:, :5], y)
    with modweights.condition(model, pad.mean(1)):  # pooling over the padding too: changed
        assert not torch.allclose(model(pad, src_key_padding_mask=mask == 0)[:, :5], y)


# ----------------------------------------------------------------------------- transformers


transformers = pytest.importorskip("transformers")


def _llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager", **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("mode,seg", CAUSAL, ids=[m for m, _ in CAUSAL])
def test_llama_causal_and_cached_generation(mode, seg):
    model = _llama()
    report = modweights.convert(model, num_experts=3, routing_mode=mode, segment_length=seg)
    routing = {r.name: (r.routing, r.why) for r in report.replaced}
    assert {r for n, (r, _) in routing.items() if n != "lm_head"} == {mode}
    # the head sees only the last positions in generate(): per token, said why
    assert routing["lm_head"][0] == "token" and (mode == "token" or "logits_to_keep" in routing["lm_head"][1])
    _perturb(model)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        ids2 = ids.clone()
        ids2[:, 6:] = (ids2[:, 6:] + 1) % 64
        torch.testing.assert_close(model(ids2).logits[:, :6], full[:, :6], rtol=0, atol=0)
        other = ids.clone()
        other[1] = (other[1] + 3) % 64  # another sample: sample 0 does not move
        torch.testing.assert_close(model(other).logits[0], full[0])
        with modweights.decoding(model):  # prompt of 5, then one token per call with the KV cache
            out = model(ids[:, :5], use_cache=True)
            steps = [out.logits]
            for t in range(5, 9):
                out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
                steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_llama_generate_matches_greedy_full_forward():
    model = _llama()
    modweights.convert(model, num_experts=3, routing_mode="prefix_mean")
    _perturb(model)
    ids = torch.randint(1, 64, (2, 4))
    model.generation_config.eos_token_id = None  # no early stop: compare all 4 tokens
    with torch.no_grad(), modweights.decoding(model):
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(4):  # greedy without a cache, outside decoding() (full forward passes)
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


def test_llama_gradient_checkpointing_gives_the_same_gradients():
    model = _llama()
    modweights.convert(model, num_experts=3, routing_mode="segment", segment_length=3)
    _perturb(model)
    model.train()
    ids = torch.randint(0, 64, (2, 8))

    def grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, g = grads()
    model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    loss_ckpt, g_ckpt = grads()
    torch.testing.assert_close(loss_ckpt, loss)
    assert len(g) == len(g_ckpt)
    for a, b in zip(g, g_ckpt):
        torch.testing.assert_close(a, b)


def test_gpt2_conv1d_converts_with_equal_outputs_and_reports_the_skipped():
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    report = modweights.convert(model, num_experts=3)
    c1d = [r for r in report.replaced if r.old_type == "Conv1D"]
    assert len(c1d) == 8 and all(r.routing == "token" for r in c1d)
    assert [(n, t) for n, t, _ in report.skipped] == [("lm_head", "Linear")] and "tied" in report.skipped[0][2]
    assert "lm_head" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # nothing left to convert: the error names every skipped layer and why
    with pytest.raises(ValueError, match=r"lm_head \(Linear\): its weight is shared"):
        modweights.convert(_gpt2(), include=["lm_head"])


@pytest.mark.parametrize("make,cls", [(_gpt2, "GPT2LMHeadModel"), (_llama, "LlamaForCausalLM")],
                         ids=["gpt2", "llama"])
def test_save_pretrained_and_load_back_exactly(make, cls, tmp_path):
    model = make()
    modweights.convert(model, num_experts=3, routing_mode="segment", segment_length=2)
    _perturb(model)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    again = modweights.from_pretrained(getattr(transformers, cls), tmp_path, attn_implementation="eager")
    assert not again.training
    layers = [m for n, m in again.named_modules() if isinstance(m, ConvertedMixtureLinear) and n != "lm_head"]
    assert layers and all(m.routing_mode == "segment" and m.segment_length == 2 for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=0)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_a_converted_inner_model_loads_back(tmp_path):
    """LlamaModel inside LlamaForCausalLM shares its config: the record names the module it
    converted, whose names are relative to it."""
    model = _llama()
    modweights.convert(model.model, num_experts=2, routing_mode="prefix_mean")
    _perturb(model)
    ids = torch.randint(0, 64, (2, 5))
    model.save_pretrained(tmp_path)
    again = modweights.from_pretrained(transformers.LlamaForCausalLM, tmp_path, attn_implementation="eager")
    assert not isinstance(again.lm_head, ConvertedMixtureLinear)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_from_pretrained_refuses_an_unconverted_folder(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not converted"):
        modweights.from_pretrained(transformers.GPT2LMHeadModel, tmp_path)


@pytest.mark.parametrize("how", ["token", "cond"])
def test_bert_padding_and_samples(how):
    """A padded encoder: per-token routing, and pooled routing from a mask-aware latent, keep
    the real tokens' outputs when padding is added, and each sample's outputs when another
    sample changes."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, attn_implementation="eager")
    model = transformers.BertModel(cfg).eval()
    modweights.convert(model, num_experts=3, style_features=16 if how == "cond" else None)
    _perturb(model)
    ids = torch.randint(1, 64, (2, 6))
    padded = torch.cat([ids, torch.zeros(2, 3, dtype=ids.dtype)], 1)
    mask = (padded != 0).long()

    def run(i, m):
        if how == "token":
            return model(i, attention_mask=m).last_hidden_state
        with modweights.condition(model, MN.masked_mean(model.embeddings.word_embeddings(i), m)):
            return model(i, attention_mask=m).last_hidden_state

    with torch.no_grad():
        y = run(ids, torch.ones_like(ids))
        torch.testing.assert_close(run(padded, mask)[:, :6], y, rtol=1e-5, atol=1e-5)
        other = ids.clone()
        other[1] = (other[1] + 7) % 63 + 1
        torch.testing.assert_close(run(other, torch.ones_like(ids))[0], y[0], rtol=1e-5, atol=1e-5)
