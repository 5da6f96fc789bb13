"""Loading the cuda backend's extension module, ``modweights._cuda`` (or its host emulation).

Split from :mod:`.cuda` by role: this module finds the build record ``setup.py`` wrote, imports
the module, checks its ABI version and tile size against this Python package and asks a device
whether the kernels run there; each answer is cached per process (``clear`` forgets them).
:mod:`.cuda` holds the registry contract, the checks and the launchers.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
from pathlib import Path

ABI_VERSION = 4  # MW_ABI_VERSION in csrc/mod_linear.h
TOKEN_TILE = 64  # MW_TOKEN_TILE: rows and columns of the per-token tiles (checked at load)
MODULE = "modweights._cuda"
STATUS_FILE = "_cuda_build.json"
_PKG_DIR = Path(__file__).resolve().parents[2]  # modweights/


@functools.lru_cache(maxsize=None)
def read_status() -> dict | None:
    """The build record setup.py wrote (read once per process)."""
    try:
        with open(_PKG_DIR / STATUS_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _not_built_reason() -> str:
    status = read_status()
    if status is None:
        return ("extension not built: no build record (install modweights with nvcc on PATH: "
                "pip install --no-build-isolation -e .)")
    reason = status.get("reason") or "extension not built"
    if status.get("log"):
        reason += f" (compiler output in {_PKG_DIR / STATUS_FILE})"
    return reason


_EMULATIONS: dict = {}  # emulation file -> its imported module


@functools.lru_cache(maxsize=None)
def load(emulation: str):
    """``(module, '')`` or ``(None, why not)``: ``modweights._cuda``, or the host-emulation
    build at the path ``emulation`` when it is not empty."""
    try:
        if emulation:
            ext = _EMULATIONS.get(emulation)
            if ext is None:  # imported once per file: an extension module is not re-initialised
                spec = importlib.util.spec_from_file_location("_cuda_emu", emulation)
                ext = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(ext)
                _EMULATIONS[emulation] = ext
        else:
            status = read_status()
            if status is not None and not status.get("built"):
                return None, _not_built_reason()
            ext = importlib.import_module(MODULE)
    except ImportError as e:
        if not emulation and getattr(e, "name", None) == MODULE:
            return None, _not_built_reason()
        return None, f"extension built but it cannot be imported: {e}"
    abi = ext.abi_version()
    if abi != ABI_VERSION:
        return None, (f"extension built for ABI {abi} but this modweights expects {ABI_VERSION}: "
                      "rebuild it (pip install --no-build-isolation -e .)")
    if ext.TOKEN_TILE != TOKEN_TILE:
        return None, (f"extension built with per-token tiles of {ext.TOKEN_TILE} but this modweights "
                      f"expects {TOKEN_TILE}: rebuild it")
    return ext, ""


@functools.lru_cache(maxsize=None)
def device_status(emulation: str, index: int) -> tuple[bool, str]:
    """Whether the extension can run on CUDA device ``index`` (it asks the device once)."""
    ext, why = load(emulation)
    if ext is None:
        return False, why
    why = ext.device_check(index)
    return (False, "built but " + why) if why else (True, "")


def clear() -> None:
    """Forget the build record, the imported module and the device answers."""
    for f in (read_status, load, device_status):
        f.cache_clear()
