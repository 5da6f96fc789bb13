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

The ``da`` and ``dW`` terms are *linear* in ``M``: through the pairs their relative error is
also ``eps * |a| |W| / |M|``, the mixture's own conditioning, so they keep the pair products
(no per-row weight, GEMMs over the bank).

Cost and memory of the exact terms: the mixed rows are formed ``chunk`` rows at a time,
``chunk = max(1, DEMOD_CHUNK_ELEMS // (O * I))``, so the largest temporary is
``max(DEMOD_CHUNK_ELEMS, O * I)`` elements whatever the batch; the work is ``K + 2`` passes
over ``R x O x I`` elements (``R`` the rows that have their own mixture: ``B``, or ``B * T``
with per-token coefficients), once in the forward and once in the backward for ``ds``.
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


def mixed_ds_term(bank, a, s, c):
    """``s_r[i] sum_o c_r[o] M_r[o, i]^2`` (the caller subtracts it from ds): a (B, Ta, K),
    s (B, Ts, I), c (B, Td, O) float -> (B, Td, I) float."""
    K, O, I = bank.shape
    B, Ta, _ = a.shape
    a_g = acc(a).reshape(B * Ta, K)
    c_g = c.reshape(B * Ta, 1, O) if Ta > 1 else c  # [G, Td_g, O]
    Wf = acc(bank).reshape(K, O * I)
    out = []
    for r0, r1 in _chunks(a_g.shape[0], O, I):
        M2 = (a_g[r0:r1] @ Wf).view(-1, O, I).square()
        out.append(c_g[r0:r1] @ M2)  # [chunk, Td_g, I]
    return acc(s) * torch.cat(out).reshape(B, -1, I)


# ----------------------------------------------------------------------------- pairs


def pairs(K, device):
    """Unordered bank pairs ``k <= l`` in row-major order ((0,0), (0,1), ..., (1,1), ...):
    (ik, il, m, pidx) with ``m`` the multiplicity (1 on the diagonal, 2 off it) and
    ``pidx[k, l] = pidx[l, k]`` the index of the pair {k, l}."""
    ik, il = torch.triu_indices(K, K, device=device)
    n = ik.shape[0]
    m = torch.where(ik == il, 1, 2)
    pidx = torch.empty(K, K, dtype=torch.long, device=device)
    ar = torch.arange(n, device=device)
    pidx[ik, il] = ar
    pidx[il, ik] = ar
    return ik, il, m, pidx


def pair_products(bank):
    """``P[p] = W_k * W_l`` for pair p = (k, l), k <= l, in :func:`pairs` order:
    [npairs, O, I] (contiguous slices of the bank, no gather)."""
    K = bank.shape[0]
    return torch.cat([bank[k:] * bank[k] for k in range(K)])


def pair_rowsums(bank, ik, il):
    """``rowsum(P_p)[o] = <W_k[o], W_l[o]>`` from the per-o Gram matrices: [npairs, O]
    (no ``npairs x O x I`` tensor)."""
    G = torch.einsum("koi,loi->klo", bank, bank)  # [K, K, O]
    return G[ik, il]


def demod_grads(bank, a, s, c, ns, na, nbank):
    """The demodulation terms of ds, dcoeffs and dbank for K > 1 (the caller subtracts them),
    in float32 or wider; c = dd * d^3 (B, Td, O) float, a (B, Ta, K), s (B, Ts, I) | None.

    ``ds`` from the mixed rows (:func:`mixed_ds_term`); ``da`` and ``dW`` (linear in M)
    through the pair products, with ``CP[p, r] = c_r @ P_p`` (one batched GEMM, [npairs, R, I])::

        da_rk -= sum_l a_rl <CP[{k,l}, r], s_r^2>         (the pair's product, no multiplicity)
        dW_k  -= sum_l W_l * F_kl,   F_kl = sum_r a_rk a_rl c_r (s_r^2)^T   (one GEMM)
    """
    bank, a, s = acc(bank), acc(a), acc(s)
    K, O, I = bank.shape
    B, Td = c.shape[:2]
    ik, il, m, pidx = pairs(K, bank.device)
    n = ik.shape[0]
    ds = da = dW = None
    if ns:
        ds = mixed_ds_term(bank, a, s, c).sum_to_size(s.shape)
    AA = a[..., ik] * a[..., il]  # [B, Ta, npairs]
    if na:
        if s is None:
            H = c @ pair_rowsums(bank, ik, il).t()  # [B, Td, npairs]
        else:
            rows = max(Td, s.shape[1])
            cr = c.expand(B, rows, O).reshape(-1, O)  # [R, O]
            CP = torch.matmul(cr, pair_products(bank))  # [npairs, R, I]
            s2 = s.square().expand(B, rows, I).reshape(-1, I)  # [R, I]
            H = torch.einsum("pri,ri->rp", CP, s2).view(B, rows, n)  # H[r, p] = <c_r @ P_p, s_r^2>
        da = (H[..., pidx] @ a.unsqueeze(-1)).squeeze(-1).sum_to_size(a.shape)  # [B, Ta, K]
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
