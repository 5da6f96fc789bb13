"""Measured backend preferences for ``auto``: which backend to run, per device, op, shape
class and dtype.

``auto`` (see :mod:`modweights.backends`) asks :func:`preferred` first on CUDA devices. The
answer comes from a table of measurements; where no entry applies, ``auto`` keeps its
built-in order. Nothing here is a guess: an entry exists only because
``python -m modweights.benchmarking.auto_table`` timed the backends on that device.

Shape classes (docs/design.md section 4, one regime each; :func:`shape_class`):

linear
    ``decode``                 one row per sample (a 2-D input, or ``T == 1``);
    ``per-token``              coefficients or styles per row, ``T > 1``;
    ``per-sample-many-rows``   per-sample conditioning, ``T >= 256`` (bound by the GEMM);
    ``per-sample-few-rows``    per-sample conditioning, ``1 < T < 256`` (bound by the mixing).
conv2d
    ``per-sample``             conv2d conditioning is always per sample: one class.

Table (JSON)::

    {"format": 1,
     "entries": [{"device": "H100", "capability": [9, 0], "op": "mod_linear",
                  "class": "per-sample-many-rows", "dtype": "bfloat16", "backend": "cuda",
                  "measured": {"cuda_ms": 1.23, "triton_ms": 1.45, "workload": "W2a ...",
                               "date": "...", "commit": "..."}}]}

An entry applies when ``device`` is a substring of :func:`torch.cuda.get_device_name`
(case-insensitive; ``""`` matches every device), ``capability`` equals the device's compute
capability, and ``op``, ``class`` and ``dtype`` equal the problem's. ``measured`` records
where the choice came from: the chosen backend's ``<backend>_ms`` median and, for any backend
but ``torch``, ``torch_ms`` (larger): a fused backend is listed only where it was measured to
beat the torch backend; plus free-form provenance (workload, pass, date, commit, versions).

Sources, first applicable entry wins: the file named by ``MODWEIGHTS_AUTO_TABLE`` (your own
measurements), then the packaged ``auto_table.json`` (shipped empty until measurements
exist). A file named by ``MODWEIGHTS_AUTO_TABLE`` that is missing or malformed is a
``ValueError`` naming the file and the problem, never ignored. Tables are read once per
process; :func:`clear_cache` re-reads them.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

FORMAT = 1
ENV = "MODWEIGHTS_AUTO_TABLE"
PACKAGED = Path(__file__).with_name("auto_table.json")

#: rows per sample from which a per-sample linear is GEMM-bound (docs/design.md section 4)
MANY_ROWS = 256

#: the shape classes of each op, in the order :func:`shape_class` tests them
CLASSES = {
    "mod_linear": ("decode", "per-token", "per-sample-many-rows", "per-sample-few-rows"),
    "mod_conv2d": ("per-sample",),
}
DTYPES = ("float32", "float16", "bfloat16")
_BACKENDS = ("reference", "torch", "triton", "cuda")  # modweights.backends.NAMES (no import cycle)
_REQUIRED = ("device", "capability", "op", "class", "dtype", "backend", "measured")


def shape_class(op: str, problem: dict) -> str | None:
    """The shape class of an ``op`` call, from the keywords the registry receives.

    Args:
        op: ``"mod_linear"`` or ``"mod_conv2d"``.
        problem: the ``resolve`` keywords: for linear ``per_token`` (bool) and ``rows``
            (rows per sample ``T``; 1 for a 2-D input), for conv2d ``groups``, ... .

    Returns:
        One of ``CLASSES[op]``, or ``None`` when the problem does not say enough (linear
        without ``rows``, or ``rows`` unknown because it is symbolic under
        ``torch.compile``): no table entry applies then.
    """
    if op == "mod_conv2d":
        return "per-sample"
    if op != "mod_linear":
        return None
    rows = problem.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool):
        return None
    if rows <= 1:
        return "decode"
    if problem.get("per_token"):
        return "per-token"
    return "per-sample-many-rows" if rows >= MANY_ROWS else "per-sample-few-rows"


# ----------------------------------------------------------------------------- the table


def validate(table, source: str) -> list[dict]:
    """The entries of a parsed table; ``ValueError`` naming ``source`` and the first problem."""

    def bad(msg):
        return ValueError(f"modweights auto table {source}: {msg}")

    if not isinstance(table, dict):
        raise bad(f"expected a JSON object with 'format' and 'entries'; got {type(table).__name__}")
    if table.get("format") != FORMAT:
        raise bad(f"'format' must be {FORMAT}; got {table.get('format')!r}")
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise bad(f"'entries' must be a list; got {type(entries).__name__}")
    for i, e in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(e, dict):
            raise bad(f"{where} must be an object; got {type(e).__name__}")
        missing = [k for k in _REQUIRED if k not in e]
        if missing:
            raise bad(f"{where} lacks {', '.join(repr(k) for k in missing)}")
        if not isinstance(e["device"], str):
            raise bad(f"{where}.device must be a string (a substring of the CUDA device name); got {e['device']!r}")
        cap = e["capability"]
        if (not isinstance(cap, list) or len(cap) != 2
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in cap)):
            raise bad(f"{where}.capability must be [major, minor] integers; got {cap!r}")
        if e["op"] not in CLASSES:
            raise bad(f"{where}.op must be one of {', '.join(CLASSES)}; got {e['op']!r}")
        if e["class"] not in CLASSES[e["op"]]:
            raise bad(f"{where}.class must be one of {', '.join(CLASSES[e['op']])} for {e['op']}; "
                      f"got {e['class']!r}")
        if e["dtype"] not in DTYPES:
            raise bad(f"{where}.dtype must be one of {', '.join(DTYPES)}; got {e['dtype']!r}")
        if e["backend"] not in _BACKENDS:
            raise bad(f"{where}.backend must be one of {', '.join(_BACKENDS)}; got {e['backend']!r}")
        m = e["measured"]
        if not isinstance(m, dict) or not any(_ms(v) for k, v in m.items() if k.endswith("_ms")):
            raise bad(f"{where}.measured must be an object with at least one positive '<backend>_ms' "
                      f"time; got {m!r}")
        b = e["backend"]
        if not _ms(m.get(f"{b}_ms")):
            raise bad(f"{where}.measured lacks '{b}_ms', the time of the backend it names")
        # a fused backend is preferred only where it was measured to beat the torch backend
        if b != "torch" and not (_ms(m.get("torch_ms")) and m[f"{b}_ms"] < m["torch_ms"]):
            raise bad(f"{where} names {b!r} but measured.torch_ms ({m.get('torch_ms')!r}) is missing or not "
                      f"larger than {b}_ms ({m[f'{b}_ms']!r}): only a measured win over torch counts")
    return entries


def _ms(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def read(path) -> list[dict]:
    """The validated entries of the table file at ``path`` (``ValueError`` if unreadable or malformed)."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except OSError as e:
        raise ValueError(f"modweights auto table {path}: cannot read it: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"modweights auto table {path}: not valid JSON: {e}") from None
    return validate(table, path)


@functools.lru_cache(maxsize=None)
def _cached(path: str) -> tuple[dict, ...]:
    return tuple(read(path))  # an exception is not cached: a bad file fails every lookup


def entries() -> list[dict]:
    """Every entry in force: the ``MODWEIGHTS_AUTO_TABLE`` file's, then the packaged ones."""
    user = os.environ.get(ENV, "")
    out = list(_cached(os.path.abspath(user))) if user else []
    return out + list(_cached(str(PACKAGED)))


def clear_cache() -> None:
    """Forget the tables read so far (the next lookup reads the files again)."""
    _cached.cache_clear()
    _device_facts.cache_clear()


# ----------------------------------------------------------------------------- lookup


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def device_facts(device) -> tuple[str, tuple[int, int]]:
    """``(name, (major, minor))`` of a CUDA device."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_facts(index)


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


def lookup(op: str, device, problem: dict, *, facts: tuple[str, tuple[int, int]] | None = None
           ) -> tuple[dict | None, str]:
    """The first applicable table entry for this call, and a sentence saying which key it
    matched (or, when ``None``, why none applies).

    Args: as :func:`preferred`.
    """
    device = torch.device(device)
    if facts is None and device.type != "cuda":
        return None, f"{device.type} tensors have no table entries (CUDA only)"
    cls = shape_class(op, problem)
    dtype = _dtype_name(problem.get("dtype"))
    if cls is None:
        return None, f"the {op} call's shape class is unknown (rows per sample not given, or symbolic)"
    if dtype is None:
        return None, "the call's dtype is unknown"
    table = entries()
    name, cap = facts if facts is not None else device_facts(device)
    key = f"{name} (sm {cap[0]}.{cap[1]}), {op}, {cls}, {dtype}"
    low, cap = name.lower(), list(cap)
    for e in table:
        if (e["op"] == op and e["class"] == cls and e["dtype"] == dtype and e["capability"] == cap
                and e["device"].lower() in low):
            return e, key
    where = f"{ENV} file and the packaged table" if os.environ.get(ENV) else "the packaged table"
    return None, f"no entry for {key} in {where} ({len(table)} entries)"


def preferred(op: str, device, problem: dict, *, facts: tuple[str, tuple[int, int]] | None = None) -> str | None:
    """The backend name the measurements favour for this call, or ``None`` where no entry applies.

    Args:
        op: ``"mod_linear"`` or ``"mod_conv2d"``.
        device: the tensors' device; only CUDA devices have entries.
        problem: the ``resolve`` keywords (``dtype``, ``per_token``, ``rows``, ...).
        facts: ``(device name, (major, minor))`` to use instead of asking CUDA (tests).

    Returns:
        A backend name from the first applicable entry. The caller still checks that the
        backend is available and supports the problem.
    """
    entry, _ = lookup(op, device, problem, facts=facts)
    return None if entry is None else entry["backend"]


__all__ = ["CLASSES", "ENV", "FORMAT", "MANY_ROWS", "PACKAGED", "clear_cache", "device_facts", "entries",
           "lookup", "preferred", "read", "shape_class", "validate"]
