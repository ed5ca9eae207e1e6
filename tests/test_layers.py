"""The package's layering stays true: no import cycle, no stage importing a stage above it, small modules.

Every `import` is counted, also those inside functions (the lazy imports that keep `carsearch --help`
fast still make a dependency)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "carsearch"

# Bottom to top. A module may import modules of its own layer's package and of lower layers only.
LAYERS: list[tuple[str, ...]] = [
    (
        "carsearch",
        "errors",
        "defaults",
        "fsutil",
        "progress",
        "provenance",
        "config",
        "faults",
        "formats",
        "h5state",
        "lazy",
        "memwatch",
    ),
    ("datasets",),
    ("models",),
    ("embed",),
    ("eval",),
    ("index",),
    ("search",),
    ("audit", "bench", "train"),
    ("serve",),
    ("cli", "__main__"),
]
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}
MAX_LINES = 400


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """The carsearch modules `path` imports (absolute, relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # `from x import y`: module x.y when y is a submodule, else x (resolved in graph()).
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "carsearch" or m.startswith("carsearch.")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in files.items():
        for target in imports_of(path, name):
            # `from carsearch.x import y` names module x.y if it exists, else x.
            while target not in files and "." in target:
                target = target.rpartition(".")[0]
            if target != name and target in files:
                edges[name].add(target)
    return {name: edges[name] for name in files}


def layer(module: str) -> tuple[int, str]:
    part = module.split(".")[1] if "." in module else "carsearch"
    assert part in LAYER_OF, f"{module}: its folder {part!r} is in no layer; add it to LAYERS"
    return LAYER_OF[part], part


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_stages_import_only_downwards() -> None:
    wrong = []
    for source, targets in graph().items():
        src_level, src_part = layer(source)
        for target in targets:
            tgt_level, tgt_part = layer(target)
            # Sideways imports are wrong between stages (bench, train, audit); the shared helpers of the
            # bottom layer and the entry points of the top one may use each other (cycles are caught above).
            sideways = tgt_level == src_level and tgt_part != src_part and 0 < src_level < len(LAYERS) - 1
            if tgt_level > src_level or sideways:
                wrong.append(f"{source} imports {target}")
    assert not wrong, "imports that go up or sideways between stages:\n" + "\n".join(sorted(wrong))


def test_modules_are_small() -> None:
    big = {module_name(p): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


MAX_PARAMETERS = 10


def long_signatures(source: str) -> list[str]:
    """Functions of `source` taking more than MAX_PARAMETERS named parameters (`**options` counts none:
    settings travel as one object or one mapping)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            count = (
                len(a.posonlyargs)
                + len(a.args)
                + len(a.kwonlyargs)
                - (a.args[:1] != [] and a.args[0].arg in ("self", "cls"))
            )
            if count > MAX_PARAMETERS:
                out.append(f"{node.name} ({count})")
    return out


def test_no_function_takes_more_than_ten_parameters() -> None:
    """Settings are passed as one dataclass (EmbedJob, IndexSettings, ...), click options as **options
    turned into one (cli/common.settings_from)."""
    long = {module_name(p): f for p in SRC.rglob("*.py") if (f := long_signatures(p.read_text()))}
    assert not long, f"functions over {MAX_PARAMETERS} parameters: {long}"
    planted = "def f(" + ", ".join(f"a{i}" for i in range(11)) + "):\n    pass\n"
    assert long_signatures(planted) == ["f (11)"]


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The oracle for the checks above: they do flag what they look for."""
    pkg = tmp_path / "carsearch"
    (pkg / "embed").mkdir(parents=True)
    (pkg / "eval").mkdir()
    (pkg / "embed" / "a.py").write_text("from carsearch.eval.b import x\n")
    (pkg / "eval" / "b.py").write_text("def f():\n    from carsearch.embed import a\n")
    global SRC
    saved, SRC = SRC, pkg
    try:
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycle()
        with pytest.raises(AssertionError, match=r"carsearch\.embed\.a imports carsearch\.eval\.b"):
            test_stages_import_only_downwards()
    finally:
        SRC = saved
