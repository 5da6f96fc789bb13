"""``python -m modweights.aot``: compile every kernel specialisation for sm_90a / sm_80 and
write the report (see :mod:`modweights.aot`)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import markdown, problems, rows_for, test_problems, workload_problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modweights.aot", description=__doc__)
    p.add_argument("--workloads", nargs="*", default=None, help="workload names or groups (default: W1-W7)")
    p.add_argument("--which", choices=("default", "all"), default="all",
                   help="the MODWEIGHTS_TRITON_AUTOTUNE=0 default only, or every config autotuning keeps")
    p.add_argument("--arch", nargs="*", type=int, default=[90, 80], help="compute capabilities (90 = sm_90a)")
    p.add_argument("--no-tests", action="store_true", help="skip the GPU tests' shapes")
    p.add_argument("--python", default=None, help="the Python whose Triton compiles (default: this one)")
    p.add_argument("--jobs", type=int, default=2, help="compile worker processes")
    p.add_argument("--out", default="benchmarks/results/aot_report", help="output path without extension")
    a = p.parse_args(argv)
    # the test shapes run with autotuning off (the GPU tests): their default config only
    tests = [] if a.no_tests else test_problems()
    version, rows = rows_for(workload_problems(a.workloads), a.which, tuple(a.arch), a.python, a.jobs, tests)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"triton": version, "rows": rows}, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(version, rows))
    bad = [r for r in rows if r["default"] and r["arch"] == 90 and problems(r) and not r["problem"].startswith("test:")]
    print(f"{len(rows)} rows (Triton {version}) -> {a.out}.json / .md; W1-W7 sm_90a defaults with problems: {len(bad)}")
    for r in bad:
        print(f"  {r['problem']} {r['kernel']} {r['config']}: {'; '.join(problems(r))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
