"""GPU-only properties of the fused backends that a CPU run cannot show.

* Streams: every kernel must run on the caller's current stream. The ops are captured into a
  CUDA graph (``torch.cuda.graph`` captures on a side stream of its own): a launch on the
  legacy default stream, or a host synchronisation, fails the capture; replaying the graph
  on new inputs written in place must then give the new answer (so nothing ran outside it).
* Determinism: with ``torch.use_deterministic_algorithms(True)``, repeated runs of a shape
  with many programs adding into the same gradients (many samples, splits, tiles) are
  bitwise equal. Under the interpreter programs run one after another, so only a GPU can
  make them race.

Skipped without a CUDA device; with ``MODWEIGHTS_REQUIRE`` naming the backend, an
unavailable backend fails instead (tests/conftest.py).
"""
import os

import pytest
import torch

from modweights import backends
from modweights import testing as T

from conftest import require_backend

# cuBLAS is deterministic only with a fixed workspace, set before cuBLAS first runs (collection
# imports this module before any test runs; tests/test_state.py does the same)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

L, C = "mod_linear", "mod_conv2d"
gpu = pytest.mark.gpu

# small shapes for the graph capture: tails in every dimension, every conditioning form
GRAPH_CASES = [
    ("triton", T.Case(L, B=3, T=40, I=48, O=40, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank")),
    ("triton", T.Case(L, B=2, T=30, I=40, O=24, K=2, coeffs="token", styles="token", demodulate=True, bias="shared")),
    ("triton", T.Case(C, B=2, I=16, O=24, K=2, H=9, W=9, coeffs="sample", styles="sample", demodulate=True,
                      bias="bank", conv={"padding": 1})),
    ("cuda", T.Case(L, B=3, T=40, I=48, O=40, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank")),
    ("cuda", T.Case(L, B=2, T=30, I=40, O=24, K=2, coeffs="token", styles="token", demodulate=True, bias="shared")),
]

# many programs summing into the same ds / da / dbank / dbias: many samples and row tiles
RACING_CASES = [
    ("triton", T.Case(L, B=32, T=64, I=512, O=384, K=4, coeffs="sample", styles="sample", demodulate=True,
                      bias="bank")),
    ("triton", T.Case(L, B=8, T=256, I=384, O=256, K=3, coeffs="token", styles="token", demodulate=True,
                      bias="bank")),
    ("triton", T.Case(C, B=16, I=64, O=64, K=4, H=32, W=32, coeffs="sample", styles="sample", demodulate=True,
                      bias="bank", conv={"padding": 1})),
    ("cuda", T.Case(L, B=32, T=64, I=512, O=384, K=4, coeffs="sample", styles="sample", demodulate=True,
                    bias="bank")),
    ("cuda", T.Case(L, B=8, T=256, I=384, O=256, K=3, coeffs="token", styles="token", demodulate=True,
                    bias="bank")),
]


def _ids(cases):
    return [f"{b}-{c.id}" for b, c in cases]


def _need(backend, case):
    require_backend(backend, "cuda")
    from modweights.verify import problem_kwargs

    ok, why = backends.load(backend).supports(case.op, **problem_kwargs(case, torch.float32))
    if not ok:
        pytest.skip(f"{backend} does not implement this case: {why}")


def _forward_backward(case, leaves, backend, gy):
    full = {k: leaves.get(k) for k in T.GRAD_NAMES}
    y = T.call(case, full, backend)
    return [y] + list(torch.autograd.grad(y, list(leaves.values()), gy))


@gpu
@pytest.mark.parametrize("backend, case", GRAPH_CASES, ids=_ids(GRAPH_CASES))
def test_gpu_kernels_run_on_the_current_stream_under_graph_capture(backend, case):
    _need(backend, case)
    inp = T.make_inputs(case, torch.float32, "cuda", seed=0)
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items() if v is not None}
    with torch.no_grad():
        y0 = T.call(case, {k: leaves.get(k) for k in T.GRAD_NAMES}, backend)
    gy = torch.randn(y0.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream: compilation, allocator pools
        for _ in range(2):
            _forward_backward(case, leaves, backend, gy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails on a launch into the legacy default stream or a host sync
        outs = _forward_backward(case, leaves, backend, gy)
    new = T.make_inputs(case, torch.float32, "cuda", seed=1)
    with torch.no_grad():
        for k, v in leaves.items():
            v.copy_(new[k])
        for o in outs:
            o.fill_(float("nan"))  # whatever the replay does not write stays NaN
    graph.replay()
    torch.cuda.synchronize()
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in new.items() if v is not None}
    expected = _forward_backward(case, ref_leaves, "reference", gy.double())
    names = ["y"] + [f"d{k}" for k in leaves]
    bad = [str(c) for c in (T.compare(n, a, e, T.TOLERANCE[torch.float32]) for n, a, e in zip(names, outs, expected))
           if not c.ok]
    assert not bad, f"{backend} {case.id} replayed on new inputs:\n  " + "\n  ".join(bad)


@gpu
@pytest.mark.parametrize("backend, case", RACING_CASES, ids=_ids(RACING_CASES))
def test_gpu_deterministic_mode_is_bitwise_repeatable_with_racing_programs(backend, case):
    _need(backend, case)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [T.run_case(case, backend, torch.float32, "cuda", seed=3) for _ in range(4)]
    finally:
        torch.use_deterministic_algorithms(old)
    for i, other in enumerate(runs[1:], 1):
        for k in runs[0]:
            diff = (runs[0][k] - other[k]).abs().max().item()
            assert torch.equal(runs[0][k], other[k]), f"{k}: run {i} differs from run 0 by up to {diff:.3g}"
    # and the repeatable answer is the right one
    expected = T.run_case(case, "reference", torch.float32, "cuda", seed=3, compute_dtype=torch.float64)
    T.assert_match(runs[0], expected, torch.float32, f"{backend} {case.id} deterministic")
