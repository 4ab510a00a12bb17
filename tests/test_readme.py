"""The README's Python blocks run as printed, in order, in one namespace (on the built-in model)."""

import re
from pathlib import Path

import pytest

from lcjax.load import resolve_model_path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_readme_python_blocks_run(capsys):
    try:
        resolve_model_path("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no Python block"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert capsys.readouterr().out.strip(), "the tour prints the model's answer"
