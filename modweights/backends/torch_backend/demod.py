"""Demodulation statistics of the `torch` backend (linear), computed so that they stay
accurate when the mixture cancels, and in float32 (or wider) for every input dtype.

Per row ``r`` of the conditioning, with ``M_r = sum_k a_rk W_k`` and styles ``s_r``::

    q[r, o]  = sum_i M_r[o, i]^2 s_r[i]^2                     d = rsqrt(q + eps)
    ds_r[i] -= s_r[i] sum_o c_r[o] M_r[o, i]^2                 (c = dd * d^3)
    da_rk   -= sum_{o,i} c_r[o] W_k[o, i] M_r[o, i] s_r[i]^2
    dW_k    -= sum_r a_rk c_r[o] M_r[o, i] s_r[i]^2

The pair expansion and where it fails. ``q`` and the ``ds`` term are *quadratic* in the
mixture: expanded over the bank's pair products ``P_kl = W_k W_l`` they are cheap (one GEMM
``Qs[r, kl, o] = sum_i s_r[i]^2 W_k[o, i] W_l[o, i]`` against ``npairs = K(K+1)/2`` products,
per *style* row, whatever the number of mixtures), but they are sums of terms of size
``|a_k a_l| |W_k s| |W_l s|`` whose total is ``|M s|^2``. When the experts nearly cancel
(``W`` and ``-W + 1e-3 noise``, coefficients 0.5 / 0.5) the rounding of the terms is
``eps * 1e6`` relative to the result: 5-10 % in float32, a negative ``q`` (NaN) at 1e-4. A
Gram-matrix form (``a^T G a``) is the same expansion. Squaring the *mixed* rows instead
leaves the error of forming ``M`` itself (``eps * |a| |W| / |M|``, which the reference shares)
but costs ``K + 2`` passes over ``R x O x I`` elements in the forward and again in the
backward (``R`` the rows with their own mixture).

The guard (:func:`_pair_stats`). Per row ``r`` and output ``o``, with ``n_k = |W_k[o] s_r|``
(the diagonal pair terms, already in ``Qs``) and ``B_q = (sum_k |a_rk| n_k)^2``: every pair
term is at most ``|a_k a_l| n_k n_l`` (Cauchy-Schwarz) and they add up to at most ``B_q``, so
the pair sum's rounding error is at most ``gamma_n * B_q`` (``n = I + npairs``, ``gamma_n ~ n u``
worst case, ``~ sqrt(n) u`` with high probability, Higham & Mary 2019): relative error
``<= c u B_q / q``. A row whose ``q < tau B_q`` for some ``o`` (``q <= 0`` included), with
``tau = sqrt(n) u / PAIR_RTOL`` (``u`` the unit roundoff of the accumulation dtype; TF32 /
bf16 where float32 matmuls may use them, which flags nearly everything), is recomputed from
its mixed rows (gathered, chunked as below); the others keep the pairs, with an estimated
relative error ``<= PAIR_RTOL = 1e-4``. Measured: the constant ``c`` is <= 5.5 for
I = 64..4096 (random banks, cancellation 1 .. 1e-3), below ``sqrt(n)`` (8..64), so the rows
passed have ``<= 0.35 * PAIR_RTOL`` on ``q`` (half that on ``d``). The same bound covers the
backward's pair terms (:func:`_guarded_grad_terms`): the ``ds`` term's error is
``<= gamma sum_o |c_o| B_q[o]`` (s-weighted l1 over i), ``<= (gamma / tau) sum_o |c_o| q_o``; the
``da`` term is linear in ``M``, error ``gamma sqrt(B_q / q)`` relative to
``sum_o |c_o| n_k sqrt(q_o)``. Flagged groups get ``c = 0`` in the pair terms and their exact
terms added. Typical (routed, non-cancelling) inputs have ``q / B_q ~ 1 / K_eff`` (random
experts; 0.05-0.6 measured for K = 2..16) against ``tau ~ 0.01`` (I = 256) .. 0.04 (I = 4096):
they never take the exact path. The decision is reported to the switch ``torch_demod_exact_hook`` (tests).

Which one, by counting (:func:`pairs_pay`): the pairs cost per style row and pair, the mixed
rows per group; per-token coefficients (``G = B*T``) take the guarded pairs, per-sample
coefficients with per-token styles (``G = B``, ``B*T`` style rows) the mixed rows of every
group (exact and cheaper there), per-sample both the pairs up to ``K ~ 4-6``.

Tracing (torch.compile / export, fake tensors, vmap, :func:`_traced`): the row selection is
data-dependent, so traced code takes the mixed rows for every row (the pre-guard cost). Under
torch.compile that is the backward (AOTAutograd traces it); the forward runs inside the
opaque custom op, eagerly, and is guarded.

The ``dW`` term is *linear* in ``M``: through the pairs its relative error is also
``eps * |a| |W| / |M|``, the mixture's own conditioning, so it keeps the pair products (one
GEMM over all rows, no per-row weight) for every row.

Cost and memory of the exact terms: the mixed rows are formed ``chunk`` rows at a time,
``chunk = max(1, DEMOD_CHUNK_ELEMS // (O * I))``, so the largest temporary is
``max(DEMOD_CHUNK_ELEMS, O * I)`` elements whatever the batch. The pairs hold ``(npairs, O, I)``
(as ``dW`` does) and ``(B, Td, npairs, O)``.

Measured (2-core CPU shared with ~100 other jobs, so min / median of 9 alternating runs in one
process), forward + backward, fp32, I = O = 256, B = 8, T = 64 unless said, softmax
coefficients; "exact" = every row from the mixed rows (the previous version), "guarded" = this:

    per-token coeffs, per-sample styles, K = 4   exact  776 / 1197 ms   guarded  87 / 185 ms
    per-token coeffs, per-token styles,  K = 4   exact  588 / 2282 ms   guarded 218 / 768 ms
    per-token coeffs, per-sample styles, K = 8   exact  574 / 2485 ms   guarded 251 / 459 ms
    per-sample coeffs and styles, B = 64, T = 1, K = 4   exact 74 / 130 ms   guarded 15 / 33 ms
    per-sample coeffs and styles, B = 64, T = 1, K = 8   exact 118 / 200 ms  guarded 104 / 217 ms
                                                          (the count keeps the mixed rows)

(the unguarded pair expansion, before the exact terms, was reported at ~80 ms for the first
line on a quieter machine).
Cancelling rows pay the pairs plus their exact terms. Errors of the cancelling cases of
tests/test_numerics.py unchanged (those rows take the exact path, which is unchanged).
"""
from __future__ import annotations

import math

import torch

from ... import _switches as switches

#: elements of the largest temporary (a chunk of mixed rows) of the exact demodulation terms
#: (tests lower it through the switch ``torch_demod_chunk_elems``)
DEMOD_CHUNK_ELEMS = 1 << 20

#: relative error allowed to a row's pair-expanded statistics (estimated, see the module
#: docstring); rows whose estimate exceeds it take the exact path
PAIR_RTOL = 1e-4

#: cost of one elementwise pass over an element, in GEMM multiply-adds (the count of
#: :func:`pairs_pay`; measured on the 2-core CPU: ~2 ns against ~0.06 ns)
EW_COST = 16


def acc(t):
    """``t`` in the accumulation dtype of the statistics: float32 for half inputs (an eps of
    1e-8 underflows in fp16, and sums of squares of values ~100 overflow it), else as is."""
    if t is None or t.dtype not in (torch.float16, torch.bfloat16):
        return t
    return t.float()


def _traced(*ts) -> bool:
    """Whether the guard's data-dependent row selection cannot run: torch.compile / export
    tracing, fake tensors, functorch transforms (vmap). Those take the exact path for all rows."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    from torch._subclasses.fake_tensor import is_fake
    return any(t is not None and (is_fake(t) or torch._C._functorch.is_functorch_wrapped_tensor(t)
                                  or t.device.type == "meta") for t in ts)


def _chunks(n: int, O: int, I: int):
    if isinstance(n, torch.SymInt) or torch.jit.is_tracing():
        return [(0, n)]  # a dynamic row count (export, jit trace): one chunk, no guard on it
    step = max(1, switches.get("torch_demod_chunk_elems", DEMOD_CHUNK_ELEMS) // max(1, O * I))
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


# ----------------------------------------------------------------------------- exact (mixed rows)


def _exact_norms(Wf, a_g, s2_g, O, I):
    """q of groups a_g (G, K), s2_g (G, Ts_g, I) | None from their mixed rows: (G, Td_g, O)."""
    out = []
    for r0, r1 in _chunks(a_g.shape[0], O, I):
        M2 = (a_g[r0:r1] @ Wf).view(-1, O, I).square()  # [chunk, O, I]
        out.append(M2.sum(-1).unsqueeze(1) if s2_g is None else s2_g[r0:r1] @ M2.transpose(1, 2))
    return torch.cat(out)


def _exact_grad_terms(Wf, a_g, s2_g, c_g, ns, na, O, I):
    """For groups a_g (G, K), s2_g (G, Ts_g, I) | None, c_g (G, Td_g, O), from their mixed rows:
    ``sum_o c[o] M[o, i]^2`` (G, Td_g, I) (the ds term without its factor s) and
    ``sum_{o,i} c[o] s[i]^2 M[o, i] W_k[o, i]`` (G, K); None where not asked."""
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
    return (torch.cat(ds) if ns else None), (torch.cat(da) if na else None)


def _c_groups(c, B, Ta, O):
    return c.reshape(B * Ta, 1, O) if Ta > 1 else c  # [G, Td_g, O]


def exact_norms(bank, a, s):
    """``q[r, o] = sum_i (s_r[i] sum_k a_rk W_k[o, i])^2`` from the mixed rows of every row:
    a (B, Ta, K), s (B, Ts, I) | None -> (B, max(Ta, Ts), O)."""
    K, O, I = bank.shape
    a_g, s2_g = _groups(a, s)
    return _exact_norms(acc(bank).reshape(K, O * I), a_g, s2_g, O, I).reshape(a.shape[0], -1, O)


def mixed_grad_terms(bank, a, s, c, ns: bool, na: bool):
    """From the mixed rows of every row: the ds term ``s_r[i] sum_o c_r[o] M_r[o, i]^2``
    (B, Td, I) and the da term ``sum_{o,i} c_r[o] s_r[i]^2 M_r[o, i] W_k[o, i]`` (B, Ta, K),
    both float (the caller subtracts them; None where not asked). a (B, Ta, K), s (B, Ts, I)
    | None, c (B, Td, O) float."""
    K, O, I = bank.shape
    B, Ta, _ = a.shape
    a_g, s2_g = _groups(a, s)
    ds, da = _exact_grad_terms(acc(bank).reshape(K, O * I), a_g, s2_g, _c_groups(c, B, Ta, O), ns, na, O, I)
    ds_t = acc(s) * ds.reshape(B, -1, I) if ns else None
    da_t = da.reshape(B, Ta, K) if na else None
    return ds_t, da_t


# ----------------------------------------------------------------------------- pairs, guarded


def pairs(K, device):
    """Unordered bank pairs ``k <= l`` in row-major order ((0,0), (0,1), ..., (1,1), ...): (ik, il)."""
    return torch.triu_indices(K, K, device=device)


def _pair_products(bank):
    """``P[p] = W_k * W_l`` for pair p = (k, l), k <= l, in :func:`pairs` order: [npairs, O, I]."""
    return torch.cat([bank[k:] * bank[k] for k in range(bank.shape[0])])


def _over_pairs(A, Qs):
    """``sum_p A[b, ta, p] Qs[b, ts, p, o]``: A (B, Ta, P), Qs (B|1, Ts, P, O) -> (B, Td, O)."""
    if Qs.shape[1] == 1:
        return A @ Qs[:, 0]
    return (A.unsqueeze(-2) @ Qs).squeeze(-2)


def _tau(dtype, I: int, K: int) -> float:
    """The guard's threshold on ``q / Bq`` (see the module docstring): ``sqrt(I + npairs) * u / PAIR_RTOL``,
    ``u`` the unit roundoff of the accumulation (TF32 / bf16 where float32 matmuls may use them);
    the switch ``torch_demod_threshold`` where a test set it."""
    forced = switches.get("torch_demod_threshold")
    if forced is not None:
        return forced
    u = torch.finfo(dtype).eps / 2
    if dtype == torch.float32:
        u = {"highest": u, "high": 2.0 ** -11}.get(torch.get_float32_matmul_precision(), 2.0 ** -9)
    return math.sqrt(I + K * (K + 1) // 2) * u / PAIR_RTOL


def _pair_stats(bank, a, s):
    """The pair-expanded statistics and the guard, bank/a/s already in the accumulation dtype.

    Returns (P [npairs, O, I], Qs [B|1, Ts, npairs, O] with ``Qs[p, o] = sum_i s^2 W_k W_l``,
    q [B, Td, O] through the pairs, exact [G] bool: the groups whose estimated relative error
    ``c u B_q / q`` exceeds PAIR_RTOL, with ``B_q = (sum_k |a_k| |W_k[o] s|)^2 >= q``)."""
    K, O, I = bank.shape
    B, Ta, _ = a.shape
    ik, il = pairs(K, bank.device)
    n = ik.shape[0]
    P = _pair_products(bank)
    if s is None:
        Qs = P.sum(-1)[None, None]  # [1, 1, npairs, O]
    else:
        Qs = (s.square() @ P.view(n * O, I).t()).unflatten(-1, (n, O))  # [B, Ts, npairs, O]
    A2m = a[..., ik] * a[..., il] * torch.where(ik == il, 1.0, 2.0).to(a.dtype)  # [B, Ta, npairs]
    q = _over_pairs(A2m, Qs)
    with torch.no_grad():
        diag = ik * K - ik * (ik - 1) // 2  # index of (k, k) in pairs order
        diag = diag[ik == il]
        root_b = _over_pairs(a.abs(), Qs[:, :, diag].sqrt())  # sum_k |a_k| |W_k[o] s|: [B, Td, O]
        flag = q < _tau(bank.dtype, I, K) * root_b.square()
        exact = flag.reshape(B * Ta, -1).any(-1)  # [G]
    return P, Qs, q, exact


def pairs_pay(B: int, Ta: int, Ts: int | None, K: int, I: int) -> bool:
    """Whether the guarded pairs cost less than the mixed rows of every group, forward plus
    backward, counted per ``O x I`` element (Ts None: no styles)::

        exact = G * (3K + 3 Td_g + 7 EW)          G = B*Ta groups of Td_g rows: mixing twice, the
                                                  GEMMs against M^2 and for da; ~7 passes over M
        pairs = npairs * (3 R + 4 EW + EW B Td / I)   R = B*Ts style rows: the Qs GEMM twice and the
                                                  ds GEMM; forming P twice; the (B, Td, npairs, O) terms

    Per-token coefficients (G = B*T) take the pairs; per-sample coefficients with per-token
    styles (G = B, R = B*T) the mixed rows; per sample both, the pairs up to K ~ 4-6."""
    Td = max(Ta, Ts or 1)
    G, Td_g = B * Ta, (1 if Ta > 1 else Td)
    npairs = K * (K + 1) // 2
    R = 0 if Ts is None else B * Ts
    exact = G * (3 * K + 3 * Td_g + 7 * EW_COST)
    pairs = npairs * (3 * R + 4 * EW_COST + EW_COST * B * Td / I)
    return pairs < exact


def _guarded(bank, a, s) -> bool:
    """Whether to take the guarded pairs (eager and cheaper by :func:`pairs_pay`)."""
    if _traced(bank, a, s):
        return False
    return pairs_pay(a.shape[0], a.shape[1], None if s is None else s.shape[1], bank.shape[0], bank.shape[2])


def _report(where, exact):
    hook = switches.get("torch_demod_exact_hook")
    if hook is not None:
        hook(where, int(exact.sum()), exact.numel())


def mixed_norms(bank, a, s):
    """``q[r, o] = sum_i (s_r[i] sum_k a_rk W_k[o, i])^2`` in float32 or wider, through the
    pairs where that is accurate and from the mixed rows where not (all rows when traced):
    a (B, Ta, K), s (B, Ts, I) | None -> (B, max(Ta, Ts), O)."""
    if not _guarded(bank, a, s):
        hook = switches.get("torch_demod_exact_hook")
        if hook is not None and not _traced(bank, a, s):
            hook("norms", a.shape[0] * a.shape[1], a.shape[0] * a.shape[1])
        return exact_norms(bank, a, s)
    bank, a, s = acc(bank), acc(a), acc(s)
    K, O, I = bank.shape
    _, q, exact = _pair_stats(bank, a, s)[1:]
    _report("norms", exact)
    if bool(exact.any()):
        idx = exact.nonzero()[:, 0]
        a_g, s2_g = _groups(a, s)
        qx = _exact_norms(bank.reshape(K, O * I), a_g[idx], None if s2_g is None else s2_g[idx], O, I)
        G = exact.shape[0]
        q = q.reshape(G, -1, O).index_copy(0, idx, qx).reshape(q.shape)
    return q


def _guarded_grad_terms(bank, a, s, c, ns, na):
    """:func:`mixed_grad_terms` through the pairs for the groups the guard passes, from the
    mixed rows for the others (bank/a/s in the accumulation dtype)::

        ds_r  -= s_r * sum_p m_p a_rk a_rl (c_r @ P_p)        (one GEMM, pairs and O summed)
        da_rk -= sum_l a_rl H[r, {k,l}],   H[r, p] = sum_o c_r[o] Qs[r, p, o]
    """
    K, O, I = bank.shape
    B, Ta, _ = a.shape
    ik, il = pairs(K, bank.device)
    n = ik.shape[0]
    P, Qs, _, exact = _pair_stats(bank, a, s)
    _report("grads", exact)
    any_exact = bool(exact.any())
    c_g = _c_groups(c, B, Ta, O)
    cp = torch.where(exact.view(-1, 1, 1), 0.0, c_g).reshape(c.shape) if any_exact else c  # the pairs' rows
    ds = da = None
    if ns:
        A2m = a[..., ik] * a[..., il] * torch.where(ik == il, 1.0, 2.0).to(a.dtype)  # [B, Ta, npairs]
        Cp = A2m.unsqueeze(-1) * cp.unsqueeze(-2)  # [B, Td, npairs, O]
        if s.shape[1] == 1:
            Cp = Cp.sum(1, keepdim=True)
        ds = Cp.reshape(B, -1, n * O) @ P.view(n * O, I)  # [B, Ts, I]
    if na:
        H = cp @ Qs[:, 0].transpose(-1, -2) if Qs.shape[1] == 1 else (Qs @ cp.unsqueeze(-1)).squeeze(-1)
        pidx = torch.empty(K, K, dtype=torch.long, device=bank.device)
        pidx[ik, il] = torch.arange(n, device=bank.device)
        pidx[il, ik] = torch.arange(n, device=bank.device)
        da = (H[..., pidx] @ a.unsqueeze(-1)).squeeze(-1).sum_to_size(B, Ta, K)  # [B, Ta, K]
    if any_exact:
        idx = exact.nonzero()[:, 0]
        G = exact.shape[0]
        a_g, s2_g = _groups(a, s)
        dsx, dax = _exact_grad_terms(bank.reshape(K, O * I), a_g[idx], None if s2_g is None else s2_g[idx],
                                     c_g[idx], ns, na, O, I)
        if ns:
            full = dsx.new_zeros((G,) + dsx.shape[1:]).index_copy(0, idx, dsx).reshape(B, -1, I)
            ds = ds + full.sum_to_size(ds.shape)
        if na:
            da = da + dax.new_zeros(G, K).index_copy(0, idx, dax).reshape(B, Ta, K)
    return (s * ds if ns else None), da


def demod_grads(bank, a, s, c, ns, na, nbank):
    """The demodulation terms of ds, dcoeffs and dbank for K > 1 (the caller subtracts them),
    in float32 or wider; c = dd * d^3 (B, Td, O) float, a (B, Ta, K), s (B, Ts, I) | None.

    ``ds`` and ``da`` guarded (:func:`_guarded_grad_terms`; all from the mixed rows when
    traced, :func:`mixed_grad_terms`); ``dW`` (linear in M, summed over all rows) through the
    pair products::

        dW_k  -= sum_l W_l * F_kl,   F_kl = sum_r a_rk a_rl c_r (s_r^2)^T   (one GEMM)
    """
    guarded = _guarded(bank, a, s) and not _traced(c)
    hook = switches.get("torch_demod_exact_hook")
    if not guarded and hook is not None and not _traced(bank, a, s, c):
        hook("grads", a.shape[0] * a.shape[1], a.shape[0] * a.shape[1])
    bank, a, s = acc(bank), acc(a), acc(s)
    K, O, I = bank.shape
    B, Td = c.shape[:2]
    ik, il = pairs(K, bank.device)
    n = ik.shape[0]
    ds = da = dW = None
    if ns or na:
        ds, da = (_guarded_grad_terms if guarded else mixed_grad_terms)(bank, a, s, c, ns, na)
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
