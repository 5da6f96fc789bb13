"""The implementations a workload is timed on, one setup each.

``<backend>``
    every modweights backend in the registry except ``reference`` (``torch``, ``triton``,
    ``cuda``), where it is available on the device and ``supports`` the op.
``dense``
    the plain op of the same shape (:func:`~torch.nn.functional.linear` /
    :func:`~torch.nn.functional.conv2d`, one weight, no conditioning): the ceiling.
``reference``
    the naive per-sample-weight implementation: the ``reference`` backend, which forms every
    sample's (linear: every row's) effective weight and lets autograd differentiate.
``naive-bmm``
    linear, per-sample conditioning: each sample's weight formed once ``(B, O, I)`` and one
    batched GEMM, the path a hand-written SMEAR / per-sample mixture takes (the
    ``reference`` backend broadcasts a matrix-vector product per row instead).
``timm-condconv``
    :class:`timm.layers.CondConv2d` with its weight set to our bank (conv mixtures without
    modulation): mix the filters, one grouped conv over the batch.
``sg2-fused``
    StyleGAN2's ``fused_modconv=True`` path (conv with styles): form the per-sample weights
    (for K > 1 mixed first, as GigaGAN does), demodulate them, one grouped conv.
``sg2-nonfused``
    StyleGAN2's ``fused_modconv=False`` path (conv with styles, K = 1): scale the input by
    the styles, one conv with the shared weight, scale the output by the demodulation
    coefficients (computed, as StyleGAN2 does, from the formed per-sample weights).
``compiled-reference``
    :func:`torch.compile` of the ``reference`` op (when enabled, and skipped with the reason
    when compilation fails or takes longer than the limit).

The two StyleGAN2 paths are written here from their definition (StyleGAN2-ADA's
``modulated_conv2d`` semantics, without its float16 pre-normalisation of weight and styles).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import backends
from .. import testing as T
from ..verify import problem_kwargs
from .workloads import Workload

#: implementations that are not modweights backends, in table order
BASELINES = ("dense", "reference", "naive-bmm", "timm-condconv", "sg2-fused", "sg2-nonfused",
             "compiled-reference")


def backend_impls() -> list[str]:
    """modweights backends that a benchmark times (every registry name but the oracle)."""
    return [n for n in backends.NAMES if n != "reference"]


def all_impls() -> list[str]:
    return backend_impls() + list(BASELINES)


class Skip(Exception):
    """An implementation that does not apply to a workload here, with the reason."""


@dataclass
class Prepared:
    """One implementation set up on one workload's inputs.

    ``forward()`` runs the op on ``leaves`` (the tensors gradients are taken for); the
    passes are built from it by :meth:`pass_fn`.
    """

    forward: Callable[[], torch.Tensor]
    leaves: list
    note: str = ""
    grad_out: torch.Tensor | None = field(default=None, repr=False)

    def pass_fn(self, name: str) -> Callable[[], None]:
        """A zero-argument callable for one pass:

        ``"fwd"``
            inference: the forward without an autograd graph;
        ``"bwd"``
            the backward alone: the forward (with its graph) runs once here, outside every
            timed call, and each call takes the gradient of every leaf through that same
            graph (``retain_graph=True``), so the time is the backward's, never a
            difference of two medians;
        ``"fwd+bwd"``
            a training step: forward, then the gradient of every leaf.
        """
        if name not in ("fwd", "bwd", "fwd+bwd"):
            raise ValueError(f"unknown pass {name!r}; choose 'fwd', 'bwd' or 'fwd+bwd'")
        if name == "fwd":
            def fwd():
                with torch.no_grad():
                    return self.forward()
            return fwd
        self._make_grad_out()
        if name == "bwd":
            y = self.forward()  # [graph kept for every call]

            def bwd():
                return torch.autograd.grad(y, self.leaves, self.grad_out, retain_graph=True)
            return bwd

        def fwd_bwd():
            y = self.forward()
            return torch.autograd.grad(y, self.leaves, self.grad_out)
        return fwd_bwd

    def training_step(self) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], object]]:
        """A training step in two halves that the runner times apart within one step:
        ``forward()`` builds the graph and returns ``y``; ``backward(y)`` takes the gradient of
        every leaf through it (and frees it). The step's ``fwd+bwd`` is the sum of the two and
        its ``bwd`` the second, so a backward can never be timed longer than its step."""
        self._make_grad_out()
        return self.forward, lambda y: torch.autograd.grad(y, self.leaves, self.grad_out)

    def _make_grad_out(self) -> None:
        if self.grad_out is None:
            with torch.no_grad():
                y = self.forward()
            # a random upstream gradient made once, outside the timed region
            self.grad_out = torch.randn_like(y)


# ----------------------------------------------------------------------------- memory guard


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def formed_weight_bytes(impl: str, case: T.Case, dtype: torch.dtype) -> int:
    """Bytes of the largest per-sample weight tensor ``impl`` materialises (0 if none).

    The ``reference`` backend's linear broadcasts ``(B, 1, O, I) @ (B, T, I, 1)``, which
    torch.matmul expands to ``(B, T, O, I)`` in memory; the conv paths form ``(B, O, I/g, kh, kw)``.
    """
    c = case
    if impl in ("reference", "compiled-reference"):
        if c.op == "mod_linear":
            return c.B * max(c.T, 1) * c.O * c.I * _itemsize(dtype)
        return c.B * c.O * (c.I // c.conv.get("groups", 1)) * c.kernel[0] * c.kernel[1] * _itemsize(dtype)
    if impl == "naive-bmm":
        return c.B * c.O * c.I * _itemsize(dtype)
    if impl in ("timm-condconv", "sg2-fused", "sg2-nonfused"):
        return c.B * c.O * (c.I // c.conv.get("groups", 1)) * c.kernel[0] * c.kernel[1] * _itemsize(dtype)
    return 0


def default_memory_limit(device: torch.device) -> int:
    """Bytes an implementation may plan to form before it is skipped: a quarter of the
    available RAM on a CPU (other processes share it), 80% of the free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 4 << 30


# ----------------------------------------------------------------------------- time limit


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`CompileTimeout` in the main thread after ``seconds`` (Unix, main
    thread only; elsewhere no limit is enforced)."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise CompileTimeout(f"took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- applicability


def applies(impl: str, wl: Workload, device: torch.device, dtype: torch.dtype, *,
            compile_enabled: bool = False, explicit: bool = False, memory_limit: int | None = None) -> None:
    """Raise :class:`Skip` with the reason when ``impl`` does not apply to ``wl`` here.

    ``explicit``: the user named ``impl`` (a backend running under the Triton interpreter
    is then timed anyway).
    """
    c = wl.case
    if impl in backend_impls():
        try:
            st = backends.status(impl, device)
        except Exception as e:  # noqa: BLE001 - a broken backend module is reported, not fatal
            raise Skip(f"failed to load: {type(e).__name__}: {e}") from None
        if not st.available:
            raise Skip(f"unavailable: {st.reason}")
        ok, reason = backends.load(impl).supports(c.op, **problem_kwargs(c, dtype))
        if not ok:
            raise Skip(f"not implemented: {reason}")
        if impl == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and not explicit:
            raise Skip("runs under the Triton interpreter here (TRITON_INTERPRET=1): a correctness "
                       "tool whose timings mean nothing; name it in --impls to time it anyway")
        return
    if impl not in BASELINES:
        raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(all_impls())}")
    if impl == "naive-bmm":
        if c.op != "mod_linear":
            raise Skip("linear only (conv peers: timm-condconv, sg2-fused)")
        if c.coeffs == "token" or c.styles == "token":
            raise Skip("per-token conditioning: forms (B, T, O, I) like the reference")
    if impl == "timm-condconv":
        if c.op != "mod_conv2d" or c.coeffs != "sample" or c.styles != "none" or c.demodulate:
            raise Skip("conv mixtures without modulation only")
        try:
            import timm.layers  # noqa: F401
        except Exception as e:  # noqa: BLE001 - missing or broken timm: say which
            raise Skip(f"timm not importable: {type(e).__name__}: {e}") from None
    if impl in ("sg2-fused", "sg2-nonfused"):
        if c.op != "mod_conv2d" or c.styles != "sample":
            raise Skip("modulated convolutions only")
        if impl == "sg2-nonfused" and (c.K != 1 or c.coeffs != "none"):
            raise Skip("needs one shared weight (K = 1)")
    if impl == "compiled-reference" and not compile_enabled:
        raise Skip("torch.compile not enabled for this run (bench: --compile on; the pytest suite: MODWEIGHTS_BENCH_COMPILE=1)")
    need = 3 * formed_weight_bytes(impl, c, dtype)  # forward's weights, their gradient, a temporary
    if memory_limit is not None and need > memory_limit:
        raise Skip(f"would form per-sample weights of ~{need / 2**30:.1f} GiB with their gradients "
                   f"(limit {memory_limit / 2**30:.1f} GiB, --mem-limit)")


# ----------------------------------------------------------------------------- setups


def _leaf(t):
    return None if t is None else t.detach().requires_grad_(True)


def _dense(c: T.Case, inp: dict) -> Prepared:
    x = _leaf(inp["x"])
    w = _leaf(inp["bank"][0].clone())  # one weight of the bank's shape: (O, I) / (O, I/g, kh, kw)
    if c.op == "mod_linear":
        return Prepared(lambda: F.linear(x, w), [x, w])
    return Prepared(lambda: F.conv2d(x, w, None, **c.conv), [x, w])


def _backend(name: str, c: T.Case, inp: dict) -> Prepared:
    leaves = {k: _leaf(v) for k, v in inp.items()}
    return Prepared(lambda: T.call(c, leaves, name), [v for v in leaves.values() if v is not None])


def _naive_bmm(c: T.Case, inp: dict, eps: float = 1e-8) -> Prepared:
    x, bank, a, s = (_leaf(inp[k]) for k in ("x", "bank", "coeffs", "styles"))

    def forward():
        M = bank[0].expand(x.shape[0], *bank.shape[1:]) if a is None else torch.einsum("bk,koi->boi", a, bank)
        if s is not None:
            M = M * s[:, None, :]  # [B, O, I]
        if c.demodulate:
            M = M * torch.rsqrt(M.square().sum(-1, keepdim=True) + eps)
        x3 = x if x.dim() == 3 else x.unsqueeze(1)  # [B, T, I]
        y = torch.bmm(x3, M.transpose(1, 2))  # [B, T, O]
        return y if x.dim() == 3 else y.squeeze(1)

    return Prepared(forward, [t for t in (x, bank, a, s) if t is not None])


def _timm(c: T.Case, inp: dict) -> Prepared:
    from timm.layers import CondConv2d

    K, O, Ig, kh, kw = inp["bank"].shape
    m = CondConv2d(c.I, c.O, (kh, kw), stride=c.conv.get("stride", 1), padding=c.conv.get("padding", 0),
                   dilation=c.conv.get("dilation", 1), groups=c.conv.get("groups", 1), bias=False,
                   num_experts=K, device=inp["x"].device, dtype=inp["x"].dtype)
    # timm keeps expert k's filter flattened in weight[k] in (O, I/g, kh, kw) order: our bank layout
    m.weight = torch.nn.Parameter(inp["bank"].detach().reshape(K, -1))
    x, a = _leaf(inp["x"]), _leaf(inp["coeffs"])
    return Prepared(lambda: m(x, a), [x, m.weight, a])


def _sg2(c: T.Case, inp: dict, fused: bool, eps: float = 1e-8) -> Prepared:
    x, bank, a, s = (_leaf(inp[k]) for k in ("x", "bank", "coeffs", "styles"))
    B, I, H, W = x.shape
    geo = dict(stride=c.conv.get("stride", 1), padding=c.conv.get("padding", 0),
               dilation=c.conv.get("dilation", 1))

    def per_sample_weights():
        base = bank[0].unsqueeze(0) if a is None else torch.einsum("bk,k...->b...", a, bank)  # [B|1, O, I, kh, kw]
        return base * s[:, None, :, None, None]  # [B, O, I, kh, kw]

    def fused_forward():
        w = per_sample_weights()
        if c.demodulate:
            w = w * torch.rsqrt(w.square().sum((2, 3, 4), keepdim=True) + eps)
        y = F.conv2d(x.reshape(1, B * I, H, W), w.reshape(B * c.O, I, *w.shape[-2:]), None, groups=B, **geo)
        return y.reshape(B, c.O, *y.shape[-2:])

    def nonfused_forward():
        y = F.conv2d(x * s[:, :, None, None], bank[0], None, **geo)
        if c.demodulate:
            d = torch.rsqrt(per_sample_weights().square().sum((2, 3, 4)) + eps)  # [B, O]
            y = y * d[:, :, None, None]
        return y

    leaves = [t for t in (x, bank, a, s) if t is not None]
    return Prepared(fused_forward if fused else nonfused_forward, leaves)


def _compiled(c: T.Case, inp: dict, timeout: float | None) -> Prepared:
    import torch._dynamo

    leaves = {k: _leaf(v) for k, v in inp.items()}

    def naive(x, bank, coeffs, styles):
        return T.call(c, {"x": x, "bank": bank, "coeffs": coeffs, "styles": styles, "bias": None}, "reference")

    compiled = torch.compile(naive, dynamic=False)
    args = [leaves[k] for k in ("x", "bank", "coeffs", "styles")]
    prep = Prepared(lambda: compiled(*args), [v for v in args if v is not None])
    try:
        # compile both graphs now (inference and training), so timing never includes them
        with time_limit(timeout):
            prep.pass_fn("fwd")()
            prep.pass_fn("fwd+bwd")()
    except CompileTimeout as e:
        torch._dynamo.reset()
        raise Skip(f"torch.compile {e} (--compile-timeout)") from None
    except Exception as e:  # noqa: BLE001 - any compiler failure is a reason to skip, said in full
        torch._dynamo.reset()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise Skip(f"torch.compile failed: {type(e).__name__}: {msg[:200]}") from None
    return prep


def prepare(impl: str, wl: Workload, inputs: dict, *, compile_timeout: float | None = None) -> Prepared:
    """Set ``impl`` up on ``inputs`` (from :func:`modweights.testing.make_inputs`); the caller
    has checked :func:`applies`. May raise :class:`Skip` (compilation)."""
    c = wl.case
    if impl in backend_impls():
        return _backend(impl, c, inputs)
    if impl == "dense":
        return _dense(c, inputs)
    if impl == "reference":
        return _backend("reference", c, inputs)
    if impl == "naive-bmm":
        return _naive_bmm(c, inputs)
    if impl == "timm-condconv":
        return _timm(c, inputs)
    if impl == "sg2-fused":
        return _sg2(c, inputs, fused=True)
    if impl == "sg2-nonfused":
        return _sg2(c, inputs, fused=False)
    if impl == "compiled-reference":
        return _compiled(c, inputs, compile_timeout)
    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(all_impls())}")


def is_oom(e: BaseException) -> bool:
    """Out of memory on either device (the CPU allocator raises a plain RuntimeError)."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower()
        or isinstance(e, MemoryError))


__all__ = ["BASELINES", "Prepared", "Skip", "all_impls", "applies", "backend_impls", "prepare",
           "formed_weight_bytes", "default_memory_limit", "is_oom", "time_limit"]
