"""The README's usage snippets run as written (a newcomer copies them first)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_a_snippet_per_family():
    text = "\n".join(_snippets())
    for name in ("ModulatedConv2d", "swap_condconv", "MixtureConv2d", "MixtureLinear"):
        assert name in text


@pytest.mark.parametrize("i", range(len(_snippets())))
def test_readme_snippet_runs(i):
    code = _snippets()[i]
    if "timm" in code:
        pytest.importorskip("timm")
    scope: dict = {}
    exec(compile(code, f"README.md snippet {i}", "exec"), scope)  # noqa: S102 - our own README
    assert scope["y"].dim() >= 2 and scope["y"].isfinite().all()
