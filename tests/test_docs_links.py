"""Every reference to a file of the project resolves inside the repository.

A reader following a citation must find the file: relative markdown links and backticked paths
in the Markdown files, and mentions of ``*.md`` files or of repository paths in code comments,
docstrings and messages. A design document outside the repository (once cited 21 times) is the
failure this catches. The checks read the files git tracks (plus untracked, non-ignored ones),
so a new file counts as soon as it exists in the work tree.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the top-level folders a path written in prose starts with
TOP = ("modweights", "tests", "docs", "benchmarks", "examples", "csrc", "triton_kernels")
CODE_SUFFIXES = {".py", ".cu", ".cuh", ".h", ".cpp", ".sh", ".toml", ".cfg"}
#: files produced by a build or a run, named in prose but never committed
GENERATED = {
    "modweights/_cuda_build.json",  # the CUDA build's status (setup.py)
    "modweights/_cuda",  # the extension module, modweights/_cuda<EXT_SUFFIX>
    "modweights/triton_kernels",  # setup.py's package_dir remap of triton_kernels/
    "examples/out",  # the examples' default output folder
    "tests/log.txt",  # a log inside the GPU check's result folder (benchmarks/gpu_check.sh)
}
#: documents being written on other branches, linked from README.md's sections for them;
#: the branch that adds one removes it from here (the test then checks it as any other)
PENDING: set[str] = set()
#: where setup.py installs the top-level triton_kernels/ (its package_dir remap)
INSTALLED_TRITON = "modweights/triton_kernels/"

_MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_BACKTICK = re.compile(r"`([^`\n]+)`")
# a path followed by a glob or a template ("csrc/mod_linear_token*.cu") names a family of files
_REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/])(?![\w./-]*[*{<])" % "|".join(TOP))
_MD_NAME = re.compile(r"(?<![\w/.-])([\w./-]*[\w-]\.md)\b")


def _files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]


FILES = _files()
MD_FILES = [p for p in FILES if p.suffix == ".md"]
CODE_FILES = [p for p in FILES if p.suffix in CODE_SUFFIXES and p.name != Path(__file__).name]


def _resolves(target: str, base: Path) -> bool:
    """``target`` names an existing file or folder, relative to ``base`` or to the root."""
    target = target.split("#")[0].split("::")[0].rstrip("/.,:;")
    target = target[2:] if target.startswith("./") else target
    target = re.sub(r":\d+(-\d+)?$", "", target)  # path:line
    if not target or target in GENERATED or target in PENDING:
        return True
    if target.startswith(INSTALLED_TRITON):  # an installed path: setup.py maps triton_kernels/ there
        target = "triton_kernels/" + target[len(INSTALLED_TRITON):]
    if (base / target).exists() or (ROOT / target).exists():
        return True
    if "/" not in target:  # a bare file name ("summary.md"): some file of the project has it
        return any(f.name == target for f in FILES)
    return any(ROOT.glob(target + ".*"))  # a path without its extension (an output stem)


def _md_refs(text: str):
    """(kind, target) for each reference of a Markdown text that must resolve."""
    for m in _MD_LINK.finditer(text):
        t = m.group(1)
        if not re.match(r"^[a-z]+:|^#|^mailto:", t):
            yield "link", t
    for m in _BACKTICK.finditer(text):
        t = m.group(1).strip()
        if re.search(r"[\s<>*{}$|]", t):  # commands, templates and globs are not paths
            continue
        if t.startswith(tuple(p + "/" for p in TOP)) or t.endswith(".md"):
            yield "path", t


def _code_refs(text: str):
    for m in _REPO_PATH.finditer(text):
        yield "path", m.group(1)
    for m in _MD_NAME.finditer(text):
        yield "doc", m.group(1)


def _dangling(paths, refs) -> list[str]:
    bad = []
    for p in paths:
        text = p.read_text(encoding="utf-8", errors="replace")
        for kind, target in refs(text):
            if not _resolves(target, p.parent):
                bad.append(f"{p.relative_to(ROOT)}: {kind} {target!r}")
    return bad


def test_markdown_links_and_paths_resolve():
    bad = _dangling(MD_FILES, _md_refs)
    assert not bad, "dangling references in Markdown:\n" + "\n".join(bad)


def test_code_mentions_of_files_resolve():
    bad = _dangling(CODE_FILES, _code_refs)
    assert not bad, "dangling references in code, comments or messages:\n" + "\n".join(bad)


@pytest.mark.parametrize("text, dangling", [
    ("see DESIGN.md section 2", ["DESIGN.md"]),
    ("see docs/design.md section 2", []),
    ("the kernels of csrc/no_such_file.cu", ["csrc/no_such_file.cu"]),
    ("tests/test_docs_links.py checks it", []),
])
def test_the_code_check_finds_a_dangling_mention(text, dangling):
    """The checker itself: it flags a missing file and passes an existing one."""
    found = [t for _, t in _code_refs(text) if not _resolves(t, ROOT)]
    assert found == dangling


@pytest.mark.parametrize("text, dangling", [
    ("[design](docs/nope.md)", ["docs/nope.md"]),
    ("[design](docs/design.md#2-gradients) and `modweights/functional.py`", []),
    ("`ENV.md` and `tests/missing_test.py`", ["ENV.md", "tests/missing_test.py"]),
    ("`csrc/mod_linear_token*.cu` and `summary.md`", []),
    ("`pip install .` and `modweights/_cuda<EXT_SUFFIX>`", []),
])
def test_the_markdown_check_finds_a_dangling_link(text, dangling):
    found = [t for _, t in _md_refs(text) if not _resolves(t, ROOT)]
    assert found == dangling
