"""The README's Python examples run as written."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        if "/api/" in block:
            continue  # the HTTP API example needs a server: tests/test_app_api.py runs it against one
        exec(compile(block, "README.md", "exec"), {})
