"""docs/annotators.md stays in step with the registry, and its Python example runs."""

import re
from pathlib import Path

import controlnet.annotators as A

DOC = Path(__file__).parents[1] / "docs" / "annotators.md"


def test_every_annotator_and_default_is_documented():
    text = DOC.read_text()
    rows: dict[str, str] = {}
    for m in re.finditer(r"^\| `(\w+)` \|.*$", text, flags=re.M):
        rows.setdefault(m.group(1), m.group(0))  # the first table: one row per annotator
    assert set(A.ANNOTATORS) <= set(rows)
    for name, ann in A.ANNOTATORS.items():
        for p in ann.params:
            if p.name == "weights":
                assert p.default in rows[name]
            else:
                default = f"{p.default:g}" if isinstance(p.default, float) else str(p.default)
                assert f"`{p.name}={default}`" in rows[name], (name, p.name)


def test_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "annotators.md", "exec"), {})
