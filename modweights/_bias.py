"""The bias part of the backward, written once for every backend's host code.

``y = ... + bias_b`` with ``bias_b = bias`` (shared, ``(O,)``) or ``a @ bias`` (a bank of biases,
``(K, O)``, mixed by the coefficients like the weights). Its gradients, over rows ``n`` that
each carry one coefficient vector ``a_n`` (a sample, or a token with per-token coefficients):

    dbias = sum_n g_n                       (shared; ``(1, O)`` for a bank without coefficients)
    dbias = sum_n a_n^T g_n = a^T g         (a bank mixed by ``a``)
    da_n += g_n bias^T                      (the bias part of dcoeffs)

``g`` is the upstream gradient summed over the rows that share a coefficient vector (``(B, O)``
per sample: the T rows of a linear sample or the pixels of a conv output; ``(B*T, O)`` per token),
so both are small GEMMs. Plain differentiable torch ops: the torch backend's double backward
runs through them.
"""
from __future__ import annotations


def bias_grads(g, a, bias, need_bias: bool, need_a: bool):
    """``(dbias, da_bias)`` for ``g (N, O)`` and ``a (N, K)`` or None, None where not needed.

    ``dbias`` has ``bias``'s shape (``(O,)`` or ``(K, O)``) in ``g``'s dtype (cast as the caller
    needs); ``da_bias`` is ``(N, K)``, present only with a bank of biases and ``a``.
    """
    if bias is None:
        return None, None
    dbias = da = None
    if need_bias:
        if bias.dim() == 1:
            dbias = g.sum(0)
        elif a is None:
            dbias = g.sum(0).unsqueeze(0)
        else:
            dbias = a.t() @ g
    if need_a and a is not None and bias.dim() == 2:
        da = g @ bias.to(g.dtype).t()
    return dbias, da
