"""Run by .ci/wheel_check.sh in a venv where only the wheel is installed (outside the source
tree): import every module of every subpackage of the installed modweights, and check the CUDA
build record says what was asked.

    python .ci/wheel_imports.py nocuda|cuda

A module may fail to import only for want of an optional dependency (one of the wheel's extras,
e.g. timm for ``modweights.compat.timm``); that is listed, and any other import error fails.
"""
import importlib
import json
import os
import pkgutil
import re
import sys
from importlib.metadata import requires

import modweights

where = os.path.dirname(modweights.__file__)
assert "site-packages" in where, f"modweights imported from {where}, not from the installed wheel"
optional = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requires("modweights") or [] if "extra ==" in r}
mods = [m for m in pkgutil.walk_packages(modweights.__path__, "modweights.") if not m.name.endswith(".__main__")]
imported, needs = [], []
for m in mods:
    try:
        importlib.import_module(m.name)
        imported.append(m.name)
    except ModuleNotFoundError as e:
        if m.ispkg or (e.name or "").split(".")[0].lower() not in optional:
            raise
        needs.append(f"{m.name} (needs {e.name}, an optional dependency)")
pkgs = sorted(m.name for m in mods if m.ispkg)
print(f"imported {len(imported)} of {len(mods)} modules; packages: modweights, {', '.join(pkgs)}")
if needs:
    print(f"not imported: {', '.join(needs)}")
assert {"modweights.aot", "modweights.triton_kernels", "modweights.backends", "modweights.nn"} <= set(pkgs), pkgs
with open(os.path.join(where, "_cuda_build.json")) as f:
    built = json.load(f)["built"]
assert built == (sys.argv[1] == "cuda"), f"{sys.argv[1]} wheel: CUDA extension built={built}"
