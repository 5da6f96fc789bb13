"""What the compiler made of every kernel: registers, spills, occupancy, cp.async, ldmatrix.

Read from a verbose build (``-Xptxas -v``) and its objects (``cuobjdump -elf`` for the
launch bounds, ``cuobjdump -sass`` for the instructions); no GPU needed. Used by
``python csrc/build.py --report [--check]`` (csrc/check_build.sh runs it with ``--check``,
and csrc/README.md's table is its output).

Per kernel instantiation and target: threads per block (``__launch_bounds__``), registers,
stack frame and spill bytes, blocks per SM as registers and threads allow (65536
registers and 2048 threads per SM on sm_80 / sm_90; dynamic shared memory is the
launcher's and not counted here), and the count of ``LDGSTS`` (cp.async), ``LDSM``
(ldmatrix) and ``HMMA`` (tensor-core MMA) instructions in its SASS.

``--check`` fails when any kernel spills or has a stack frame, when a GEMM kernel's SASS
has no LDGSTS, or when the forward / dx GEMMs fit fewer than 2 blocks per SM.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

#: kernels whose main loop must be a cp.async pipeline (LDGSTS in the SASS): the per-sample
#: GEMMs, and the per-token forward (job 1) and dx (job 2) on 16-bit tiles, whose bank tile is
#: raw (not the float16 forward on fp32 tiles, `<__half, 1, float>`: float16 with demodulation)
GEMM_KERNELS = re.compile(r"_mod_linear_(fwd|bwd_dx|bwd_weight)_kernel|"
                          r"_mod_linear_token_rows_kernelI(13__nv_bfloat16|6__half)Li[12]E(?!f)")
#: kernels that must fit 2 blocks per SM by registers (forward and dx)
OCCUPANCY_2 = re.compile(r"_mod_linear_(fwd|bwd_dx)_kernel")
REGS_PER_SM, THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32


@dataclass
class Kernel:
    name: str  # mangled
    arch: str
    regs: int = 0
    stack: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    threads: int = 0
    sass: dict = field(default_factory=dict)

    @property
    def blocks_per_sm(self) -> int:
        if not self.threads or not self.regs:
            return 0
        warps = -(-self.threads // 32)
        per_warp = -(-self.regs * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = (REGS_PER_SM // per_warp) // warps
        return min(by_regs, THREADS_PER_SM // self.threads, MAX_BLOCKS_PER_SM)


def parse_ptxas(log: str) -> dict[tuple[str, str], Kernel]:
    """(mangled name, arch) -> Kernel from the ``-Xptxas -v`` lines of a build log."""
    out: dict[tuple[str, str], Kernel] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = out.setdefault((m.group(1), m.group(2)), Kernel(m.group(1), m.group(2)))
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_st, cur.spill_ld = (int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.regs = int(m.group(1))
    return out


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """cuobjdump from PATH, the toolkit, or Triton's copy (``triton/backends/nvidia/bin``)."""
    cand = [shutil.which("cuobjdump")]
    if nvcc:
        cand.append(str(Path(os.path.realpath(nvcc)).parent / "cuobjdump"))
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            cand.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except (ImportError, ValueError):
        pass
    return next((c for c in cand if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _sections(text: str):
    """Yield (arch, line) over cuobjdump output that names ``arch = sm_X`` per fatbin entry."""
    arch = None
    for line in text.splitlines():
        m = re.match(r"arch = (sm_\w+)", line.strip())
        if m:
            arch = m.group(1)
        yield arch, line


def read_objects(objs: list[Path], kernels: dict, cuobjdump: str) -> None:
    """Fill threads (EIATTR_MAX_THREADS) and SASS instruction counts into ``kernels``."""
    for obj in objs:
        elf = subprocess.run([cuobjdump, "-elf", str(obj)], capture_output=True, text=True).stdout
        name, prev = None, ""
        for arch, line in _sections(elf):
            m = re.match(r"\.nv\.info\.(\S+)$", line.strip())
            if m:
                name = m.group(1)
                continue
            m = re.search(r"Value:\s+0x([0-9a-f]+) 0x([0-9a-f]+) 0x([0-9a-f]+)", line)
            if m and name and (name, arch) in kernels and "MAX_THREADS" in prev:
                kernels[(name, arch)].threads = int(m.group(1), 16) * int(m.group(2), 16) * int(m.group(3), 16)
            if "EIATTR" in line:
                prev = line
            elif not line.strip().startswith(("Format", "Value")):
                prev = ""
        sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True).stdout
        cur = None
        for arch, line in _sections(sass):
            m = re.search(r"Function : (\S+)", line)
            if m:
                cur = kernels.get((m.group(1), arch))
                continue
            if cur is not None:
                for op in ("LDGSTS", "LDSM", "HMMA"):
                    if re.search(rf"\b{op}\b", line):
                        cur.sass[op] = cur.sass.get(op, 0) + 1


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short readable names (``mw::`` and the parameter list dropped)."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    except OSError:
        out = names
    short = {}
    for n, d in zip(names, out):
        d = d.replace("mw::", "").replace("(MwModLinearParams)", "").replace("__nv_bfloat16", "bf16")
        short[n] = d.replace("__half", "f16").replace("<float", "<f32")
    return short


def table(kernels: dict) -> str:
    names = demangle(sorted({k.name for k in kernels.values()}))
    rows = ["| kernel | target | threads | registers | spill bytes (st/ld) | stack | blocks/SM (regs) | "
            "LDGSTS | LDSM | HMMA |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in sorted(kernels.values(), key=lambda k: (names[k.name], k.arch)):
        s = k.sass
        rows.append(f"| `{names[k.name]}` | {k.arch} | {k.threads or '?'} | {k.regs} | {k.spill_st}/{k.spill_ld} | "
                    f"{k.stack} | {k.blocks_per_sm or '?'} | {s.get('LDGSTS', 0)} | {s.get('LDSM', 0)} | "
                    f"{s.get('HMMA', 0)} |")
    return "\n".join(rows)


def problems(kernels: dict) -> list[str]:
    """What ``--check`` fails on."""
    names = demangle(sorted({k.name for k in kernels.values()}))
    bad = []
    for k in kernels.values():
        n = f"{names[k.name]} ({k.arch})"
        if k.spill_st or k.spill_ld or k.stack:
            bad.append(f"{n}: {k.spill_st}/{k.spill_ld} bytes spilled, {k.stack} bytes of stack")
        if GEMM_KERNELS.search(k.name) and not k.sass.get("LDGSTS"):
            bad.append(f"{n}: no LDGSTS (cp.async) in the SASS")
        if OCCUPANCY_2.search(k.name) and k.blocks_per_sm < 2:
            bad.append(f"{n}: {k.blocks_per_sm} block(s) per SM by registers ({k.regs} x {k.threads} threads); "
                       "2 wanted")
    if not kernels:
        bad.append("no ptxas lines in the build log (was it built with --verbose?)")
    return sorted(bad)


BEGIN, END = "<!-- ptxas-report -->", "<!-- /ptxas-report -->"


def write_readme(path: Path, text: str, how: str) -> None:
    """Replace the table between the ptxas-report markers of ``path``."""
    doc = path.read_text()
    a, b = doc.find(BEGIN), doc.find(END)
    if a < 0 or b < a:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} section to write the report into")
    doc = doc[: a + len(BEGIN)] + f"\n\nGenerated by {how}:\n\n{text}\n\n" + doc[b:]
    path.write_text(doc)
