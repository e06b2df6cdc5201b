"""The architecture as the code has it: layers, no cycles, small modules, a current map."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def arch():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "tools" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def graph(arch):
    return arch.import_graph()


def test_no_import_cycles(arch, graph):
    assert arch.cycles(graph) == []


def test_every_import_points_down_the_layers(arch, graph):
    """A module imports from its own layer and those below: the shells call the jobs, generation
    calls the families, the families call the method; never the other way."""
    assert arch.upward_imports(graph) == []
    assert all(arch.part_of(m) is not None for m in graph)  # every module is placed in a layer


def test_no_module_is_over_500_lines(arch):
    long = {m: n for m, n in arch.line_counts().items() if n > arch.MAX_LINES}
    assert long == {}


def test_the_generic_layers_name_no_family(arch, graph):
    """Generation, the shells and the method reach a family only through the protocol and the
    registry: none imports a family's own modules."""
    generic = ("generation", "serving", "model", "evaluation", "cli.generate", "cli.serve", "demo")
    reached = {
        (a, b)
        for a, targets in graph.items()
        if a.startswith(generic)
        for b in targets
        if b.startswith("families.sd")
    }
    assert reached == set()


def test_the_picture_and_the_map_are_the_code_of_today(arch, graph):
    """docs/architecture.md and its picture were generated from this import graph
    (`python tools/architecture.py` brings them up to date)."""
    assert arch.generated_block() == arch.map_markdown(graph)
    with Image.open(arch.PICTURE) as picture:
        assert picture.text.get("graph-digest") == arch.digest(graph)


def test_the_documented_routes_name_modules_that_exist(arch):
    """Every module, class and function the routes in docs/architecture.md name exists."""
    import re

    text = arch.DOC.read_text().split(arch.END)[1]
    modules = arch.modules()

    def exists(name: str) -> bool:
        if name in modules or any(m.startswith(name + ".") for m in modules):
            return True
        parent, _, attr = name.rpartition(".")
        if parent not in modules:
            return parent != name and exists(parent) and bool(re.search(rf"def {attr}\b", _source(parent)))
        return bool(re.search(rf"^(class|def) {attr}\b|^{attr}\b\s*[:=]", modules[parent].read_text(), re.M))

    def _source(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return modules[name].read_text()

    named = set(re.findall(r"`controlnet\.([A-Za-z_.]+?)(?:\(\))?`", text))
    assert named and {n for n in named if not exists(n)} == set()
