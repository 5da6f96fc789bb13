"""The one launch path of the Triton kernels (triton_kernels/_launch.py), on the CPU: which tiles a
launch runs with in each regime, that both ops' launchers send every kernel through it, and the
one absent-tensor convention (triton_kernels/_host.py ``absent`` / ``ptr``)."""
import dataclasses

import pytest
import torch

L = pytest.importorskip("modweights.triton_kernels._launch")
from modweights.triton_kernels import _record  # noqa: E402
from modweights.triton_kernels import _tiles  # noqa: E402
from modweights.triton_kernels import mod_conv2d as MC  # noqa: E402
from modweights.triton_kernels import mod_linear as ML  # noqa: E402


class _Fn:
    __name__ = "_fake_kernel"


class FakeKernel:
    """Stands for a raw ``@triton.jit`` function: ``kernel[grid](*args, **kw)`` is recorded."""

    arg_names = ["x_ptr", "n", "FLAG", "BLOCK"]
    fn = _Fn()

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def _register(monkeypatch, configs=(), tuned=None):
    raw = FakeKernel()
    k = L.Kernel(raw, "test", dict(BLOCK=16), tuple(configs), (lambda cfgs, named, **kw: cfgs[1:]) if configs
                 else None, tuned)
    monkeypatch.setitem(L.KERNELS, raw, k)
    return raw


CONFIGS = (_tiles.config(4, 3, BLOCK=64), _tiles.config(8, 4, BLOCK=128), _tiles.config(4, 2, BLOCK=32))


def test_each_regime_runs_its_tiles(monkeypatch):
    """Interpreter: the fixed tiles; a GPU with autotuning off: the first config the pruning keeps
    (warps and stages included); on: the autotuned wrapper; an untuned kernel: its fixed tiles."""
    tuned = FakeKernel()
    raw = _register(monkeypatch, CONFIGS, tuned)
    grid = lambda m: (m["BLOCK"],)  # noqa: E731
    x = torch.empty(3)
    monkeypatch.setattr(L, "INTERPRETED", True)
    L.launch(raw, grid, (x, 7), dict(FLAG=True))
    assert raw.calls.pop() == ((16,), (x, 7), dict(FLAG=True, BLOCK=16))
    monkeypatch.setattr(L, "INTERPRETED", False)
    monkeypatch.setattr(L, "AUTOTUNE", False)
    L.launch(raw, grid, (x, 7), dict(FLAG=True))
    assert raw.calls.pop() == ((128,), (x, 7), dict(FLAG=True, BLOCK=128, num_warps=8, num_stages=4))
    monkeypatch.setattr(L, "AUTOTUNE", True)
    L.launch(raw, grid, (x, 7), dict(FLAG=True))
    assert not raw.calls and tuned.calls.pop() == (grid, (x, 7), dict(FLAG=True))
    fixed = _register(monkeypatch)
    L.launch(fixed, (5,), (x, 7), dict(FLAG=False))
    assert fixed.calls.pop() == ((5,), (x, 7), dict(FLAG=False, BLOCK=16))


def test_recording_runs_nothing_and_keeps_the_candidates(monkeypatch):
    raw = _register(monkeypatch, CONFIGS)
    with _record.recording() as rec:
        L.launch(raw, lambda m: (m["BLOCK"], 2), (torch.empty(3), 7), dict(FLAG=True))
    assert not raw.calls and len(rec) == 1
    launch = rec[0]
    assert launch.configs == [({"BLOCK": 128}, 8, 4), ({"BLOCK": 32}, 4, 2)]
    assert launch.default == launch.configs[0] and launch.grid == (128, 2) and launch.name == "_fake_kernel"


def test_register_builds_the_autotuned_wrapper_on_a_gpu_only(monkeypatch):
    raw = FakeKernel()
    monkeypatch.setattr(L, "autotuned", lambda kernel, configs, key, prune, reset_to_zero=None: ("tuned", kernel))
    monkeypatch.setattr(L, "INTERPRETED", False)
    assert L.register("test", raw, dict(BLOCK=16), CONFIGS, ["n"]).tuned == ("tuned", raw)
    assert L.register("test", raw, dict(BLOCK=16)).tuned is None  # no candidates: fixed tiles
    monkeypatch.setattr(L, "INTERPRETED", True)
    assert L.register("test", raw, dict(BLOCK=16), CONFIGS, ["n"]).tuned is None
    del L.KERNELS[raw]


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def _recorded(run):
    with _record.recording() as rec:
        run()
    return list(rec)


def _linear_launches(coeffs, styles, demodulate):
    x, bank = _meta(2, 3, 8), _meta(2 if coeffs else 1, 5, 8)
    a = _meta(2, 2) if coeffs else None
    s = _meta(2, 8) if styles else None
    needs = (True, True, coeffs, styles, False)

    def run():
        y, d = ML.forward(x, bank, a, s, None, demodulate, 1e-8)
        ML.backward(_meta(2, 3, 5), x, bank, a, s, None, d, y, demodulate, 1e-8, needs)
    return x, _recorded(run)


def _conv_launches(coeffs, styles, demodulate, groups=1):
    x = _meta(2, 4, 6, 6)
    bank = _meta(2 if coeffs else 1, 4, 4 // groups, 3, 3)
    a = _meta(2, 2) if coeffs else None
    s = _meta(2, 4) if styles and groups == 1 else None
    geo = ((1, 1), (1, 1), (1, 1), groups)

    def run():
        y, d = MC.forward(x, bank, a, s, None, demodulate, 1e-8, *geo)
        MC.backward(_meta(2, 4, 6, 6), x, bank, a, s, None, d, y, demodulate, 1e-8, *geo,
                    (True, True, coeffs, s is not None, False))
    return x, _recorded(run)


@pytest.mark.parametrize("make", [
    lambda: _linear_launches(False, False, False), lambda: _linear_launches(False, True, True),
    lambda: _linear_launches(True, False, False),
    lambda: _conv_launches(False, False, False), lambda: _conv_launches(True, True, True),
    lambda: _conv_launches(True, False, True, groups=4)],
    ids=["linear-plain", "linear-mod-demod", "linear-mix", "conv-plain", "conv-mix-mod-demod", "conv-depthwise"])
def test_every_launch_is_registered_and_absent_tensors_are_placeholders(make):
    """Both ops' launchers send every kernel through the one launch path (the depthwise ones
    included), and an absent tensor is the 1-element float32 placeholder, never an input standing
    in for it (``x`` appears only as the input)."""
    x, launches = make()
    assert launches
    for launch in launches:
        assert launch.kernel in L.KERNELS, launch.name
        for name, arg in launch.named_args().items():
            if name != "x_ptr":
                assert arg is not x, (launch.name, name)
            if isinstance(arg, torch.Tensor) and arg.numel() == 1:
                assert arg.dtype == torch.float32, (launch.name, name)


def test_the_registered_default_is_the_first_pruned_config():
    """With autotuning off a tuned kernel runs the first candidate its pruning keeps; the fixed
    tiles are the interpreter's (or an untuned kernel's) and every kernel is registered once."""
    names = [k.name for k in L.KERNELS.values() if k.op in ("mod_linear", "mod_conv2d")]
    assert len(names) == len(set(names)) >= 15
    for k in L.tuned_kernels():
        assert k.prune is not None and k.fixed, k.name
    fwd = L.KERNELS[MC._mod_conv2d_fwd_kernel]
    named = dict(x_ptr=torch.empty(1, dtype=torch.float16))
    first = fwd.prune(list(fwd.configs), named, BLOCK_K=1)[0]
    args = [named["x_ptr"]]
    got = L.default_meta(MC._mod_conv2d_fwd_kernel, args, dict(BLOCK_K=1))
    assert got == dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
    assert dataclasses.is_dataclass(fwd)


# ----------------------------------------------------------------------------- named constexpr modes


def test_modes_are_named_once_and_the_kernels_use_the_names():
    """DEMOD / BIAS values have one definition (triton_kernels/_modes.py): distinct host ints with
    equal constexpr twins, and no kernel or launcher compares a mode with a bare number."""
    import re
    from pathlib import Path

    from modweights.triton_kernels import _modes as M
    for enum, prefix in ((M.Demod, "DEMOD_"), (M.Bias, "BIAS_")):
        values = {n: v for n, v in vars(enum).items() if n.isupper()}
        assert len(set(values.values())) == len(values)
        for n, v in values.items():
            twin = getattr(M, prefix + n)
            assert type(v) is int and twin.value == v, (prefix, n)
    folder = Path(M.__file__).resolve().parent
    bare = re.compile(r"\b(DEMOD|BIAS|demod|demod_flag|demod_dx|bias_flag)\s*[!=]=\s*\d")
    hits = [f"{p.name}:{i}" for p in sorted(folder.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if bare.search(line)]
    assert not hits, hits


@pytest.mark.parametrize("bias, coeffs, want", [
    (None, None, "NONE"), ((5,), None, "SHARED"), ((1, 5), None, "SHARED"), ((3, 5), (2, 3), "BANK")])
def test_bias_mode_names(bias, coeffs, want):
    from modweights.triton_kernels import _modes as M
    from modweights.triton_kernels.mod_linear_layout import _bias_mode
    mode, t, _ = _bias_mode(None if bias is None else torch.zeros(bias),
                            None if coeffs is None else torch.zeros(coeffs))
    assert mode == getattr(M.Bias, want) and (t is None) == (bias is None)
    if want == "SHARED":
        assert t.dim() == 1


@pytest.mark.parametrize("T, coeffs, styles, demodulate, want", [
    (64, False, "sample", False, "OFF"),
    (64, True, "sample", True, "LOOP"),     # rows of one sample: d from the mixed tile in the loop
    (3, False, "token", True, "ROW"),       # per-token styles: each row's norm beside the GEMM
    (3, True, "sample", True, "READ"),      # stacked (few rows): d from the pre-pass, read
    (300, True, "sample", True, "READ")])   # many rows per sample: the same
def test_forward_demod_mode_per_layout(T, coeffs, styles, demodulate, want):
    """The forward launches its kernel with the named demodulation mode each layout needs."""
    from modweights.triton_kernels import _modes as M
    B, I, O, K = 2, 64, 64, 2 if coeffs else 1
    x, bank = _meta(B, T, I), _meta(K, O, I)
    a = _meta(B, K) if coeffs else None
    s = _meta(B, I) if styles == "sample" else _meta(B, T, I)
    launches = _recorded(lambda: ML.forward(x, bank, a, s, None, demodulate, 1e-8))
    fwd = [launch for launch in launches if launch.kernel is ML._mod_linear_fwd_kernel]
    assert len(fwd) == 1 and fwd[0].flags["DEMOD"] == getattr(M.Demod, want)
    pre = [launch.name for launch in launches if launch.kernel is not ML._mod_linear_fwd_kernel]
    assert pre == (["_mod_linear_demod_kernel"] if want == "READ" else [])
