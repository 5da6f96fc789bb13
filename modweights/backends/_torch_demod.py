"""Demodulation statistics of the `torch` backend (linear), computed so that they stay
accurate when the mixture cancels, and in float32 (or wider) for every input dtype.

Per row ``r`` of the conditioning, with ``M_r = sum_k a_rk W_k`` and styles ``s_r``::

    q[r, o]  = sum_i M_r[o, i]^2 s_r[i]^2                     d = rsqrt(q + eps)
    ds_r[i] -= s_r[i] sum_o c_r[o] M_r[o, i]^2                 (c = dd * d^3)
    da_rk   -= sum_{o,i} c_r[o] W_k[o, i] M_r[o, i] s_r[i]^2
    dW_k    -= sum_r a_rk c_r[o] M_r[o, i] s_r[i]^2

Why not the pair expansion for everything. ``q`` and the ``ds`` term are *quadratic* in the
mixture: expanded over the bank's pair products ``W_k W_l`` they are sums of terms of size
``|a|^2 |W|^2`` whose total is ``|M|^2``. When the experts nearly cancel (``W`` and
``-W + 1e-3 noise``, coefficients 0.5 / 0.5: ``|M| / (|a| |W|) ~ 1e-3``) the rounding of the
terms, ``eps * |a|^2 |W|^2``, is ``eps * 1e6`` relative to the result: 5-10 % in float32, and a
negative ``q`` (NaN) at 1e-4. A Gram-matrix form (``a^T G a`` with ``G = W diag(s^2) W^T``) is
the same expansion and cancels the same way. So ``q`` and the ``ds`` term square the *mixed*
rows: the error is then ``eps * |a| |W| / |M|`` relative (that of forming ``M`` itself, which
the reference shares), ``eps * 1e3`` in the example.

The ``dW`` term is *linear* in ``M``: through the pairs its relative error is also
``eps * |a| |W| / |M|``, the mixture's own conditioning, so it keeps the pair products (one
GEMM over all rows, no per-row weight). The ``da`` term is linear too but is taken from the
mixed rows that the ``ds`` term forms anyway (measured: ~10x closer to the reference than
through the pairs when the experts cancel, for per-sample coefficients).

Cost and memory of the exact terms: the mixed rows are formed ``chunk`` rows at a time,
``chunk = max(1, DEMOD_CHUNK_ELEMS // (O * I))``, so the largest temporary is
``max(DEMOD_CHUNK_ELEMS, O * I)`` elements whatever the batch; the work is ``K + 2`` passes
over ``R x O x I`` elements (``R`` the rows that have their own mixture: ``B``, or ``B * T``
with per-token coefficients), once in the forward and once in the backward (``ds`` and ``da``).
This is dearer than the pairs where the pair GEMMs were small (per-sample styles: one row of
``s^2`` per sample against ``K(K+1)/2`` products, independent of T). Measured on a 2-core CPU,
forward + backward, I = O = 256, K = 4: per-token coefficients B = 8, T = 64 about 80 -> 580 ms
(per-sample styles) and 100-140 -> 380-600 ms (per-token styles); per-sample coefficients at
T = 1 about 80-120 -> 140 ms; K = 1 and no demodulation unchanged (the only cases that pay are
K > 1 with demodulation, where the pair expansion is not accurate). Accumulating the pair
terms in float64 instead would be cheaper on a CPU (error ``eps64 * cond^2``, below the
float32 mixture's own ``eps32 * cond`` up to ``cond ~ 1e8``) but not on most GPUs.
"""
from __future__ import annotations

import torch

#: elements of the largest temporary (a chunk of mixed rows) of the exact demodulation terms
DEMOD_CHUNK_ELEMS = 1 << 20


def acc(t):
    """``t`` in the accumulation dtype of the statistics: float32 for half inputs (an eps of
    1e-8 underflows in fp16, and sums of squares of values ~100 overflow it), else as is."""
    if t is None or t.dtype not in (torch.float16, torch.bfloat16):
        return t
    return t.float()


def _chunks(n: int, O: int, I: int):
    step = max(1, DEMOD_CHUNK_ELEMS // max(1, O * I))
    return [(r, min(n, r + step)) for r in range(0, n, step)]


def _groups(a, s):
    """Rows that share one mixture: per-token coefficients (Ta = T > 1) give one group per row.
    Returns (a_g (G, K) float, s2_g (G, Ts_g, I) float | None)."""
    B, Ta, K = a.shape
    a_g = acc(a).reshape(B * Ta, K)
    if s is None:
        return a_g, None
    s2 = acc(s).square()
    if Ta > 1:
        s2 = s2.expand(B, Ta, s.shape[-1]).reshape(B * Ta, 1, s.shape[-1])
    return a_g, s2


def mixed_norms(bank, a, s):
    """``q[r, o] = sum_i (s_r[i] sum_k a_rk W_k[o, i])^2`` from the mixed rows, in float32 or
    wider: a (B, Ta, K), s (B, Ts, I) | None -> (B, max(Ta, Ts), O)."""
    K, O, I = bank.shape
    B = a.shape[0]
    a_g, s2 = _groups(a, s)
    Wf = acc(bank).reshape(K, O * I)
    out = []
    for r0, r1 in _chunks(a_g.shape[0], O, I):
        M2 = (a_g[r0:r1] @ Wf).view(-1, O, I).square()  # [chunk, O, I]
        out.append(M2.sum(-1).unsqueeze(1) if s2 is None else s2[r0:r1] @ M2.transpose(1, 2))
    return torch.cat(out).reshape(B, -1, O)


def mixed_grad_terms(bank, a, s, c, ns: bool, na: bool):
    """From the mixed rows, a chunk at a time: the ds term ``s_r[i] sum_o c_r[o] M_r[o, i]^2``
    (B, Td, I) and the da term ``sum_{o,i} c_r[o] s_r[i]^2 M_r[o, i] W_k[o, i]`` (B, Ta, K),
    both float (the caller subtracts them; None where not asked). a (B, Ta, K), s (B, Ts, I)
    | None, c (B, Td, O) float."""
    K, O, I = bank.shape
    B, Ta, _ = a.shape
    a_g = acc(a).reshape(B * Ta, K)
    c_g = c.reshape(B * Ta, 1, O) if Ta > 1 else c  # [G, Td_g, O]
    s2_g = None
    if s is not None:
        s2_g = acc(s).square()
        s2_g = s2_g.expand(B, Ta, I).reshape(B * Ta, 1, I) if Ta > 1 else s2_g  # [G, Ts_g, I]
    Wf = acc(bank).reshape(K, O * I)
    ds, da = [], []
    for r0, r1 in _chunks(a_g.shape[0], O, I):
        M = (a_g[r0:r1] @ Wf).view(-1, O, I)  # [chunk, O, I]
        cc = c_g[r0:r1]
        if ns:
            ds.append(cc @ M.square())  # [chunk, Td_g, I]
        if na:
            if s2_g is None:
                E = cc.sum(1).unsqueeze(-1)  # [chunk, O, 1]
            else:
                ss = s2_g[r0:r1]
                rows = max(cc.shape[1], ss.shape[1])
                E = cc.expand(-1, rows, O).transpose(1, 2) @ ss.expand(-1, rows, I)  # [chunk, O, I]
            da.append((M * E).reshape(M.shape[0], O * I) @ Wf.t())  # [chunk, K]
    ds_t = acc(s) * torch.cat(ds).reshape(B, -1, I) if ns else None
    da_t = torch.cat(da).reshape(B, Ta, K) if na else None
    return ds_t, da_t


# ----------------------------------------------------------------------------- pairs


def pairs(K, device):
    """Unordered bank pairs ``k <= l`` in row-major order ((0,0), (0,1), ..., (1,1), ...): (ik, il)."""
    return torch.triu_indices(K, K, device=device)


def demod_grads(bank, a, s, c, ns, na, nbank):
    """The demodulation terms of ds, dcoeffs and dbank for K > 1 (the caller subtracts them),
    in float32 or wider; c = dd * d^3 (B, Td, O) float, a (B, Ta, K), s (B, Ts, I) | None.

    ``ds`` and ``da`` from the mixed rows (:func:`mixed_grad_terms`, which holds them anyway
    for ``ds``); ``dW`` (linear in M, summed over all rows) through the pair products::

        dW_k  -= sum_l W_l * F_kl,   F_kl = sum_r a_rk a_rl c_r (s_r^2)^T   (one GEMM)
    """
    bank, a, s = acc(bank), acc(a), acc(s)
    K, O, I = bank.shape
    B, Td = c.shape[:2]
    ik, il = pairs(K, bank.device)
    n = ik.shape[0]
    ds = da = dW = None
    if ns or na:
        ds, da = mixed_grad_terms(bank, a, s, c, ns, na)
        if ns:
            ds = ds.sum_to_size(s.shape)
    AA = a[..., ik] * a[..., il]  # [B, Ta, npairs]
    if nbank:
        Cp = AA.unsqueeze(-1) * c.unsqueeze(-2)  # [B, Td, npairs, O]
        if s is None:
            Fp = Cp.reshape(-1, n, O).sum(0).unsqueeze(-1)  # [npairs, O, 1]
        else:
            rows = max(Td, s.shape[1])
            Fp = (Cp.expand(B, rows, n, O).reshape(-1, n * O).t()
                  @ s.square().expand(B, rows, I).reshape(-1, I)).view(n, O, I)  # [npairs, O, I]
        # pairs (k, l >= k) are the contiguous block Fp[start_k : start_k + K - k]: W_l * F_kl
        # goes to dW_k, and off the diagonal W_k * F_kl to dW_l
        parts = [[] for _ in range(K)]
        start = 0
        for k in range(K):
            blk = Fp[start:start + K - k]
            parts[k].append((bank[k:] * blk).sum(0))
            if k + 1 < K:
                low = bank[k] * blk[1:]  # [K-k-1, O, I]
                for j in range(K - k - 1):
                    parts[k + 1 + j].append(low[j])
            start += K - k
        dW = torch.stack([sum(ps[1:], ps[0]) for ps in parts])  # [K, O, I]
    return ds, da, dW
