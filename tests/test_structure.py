"""The package's shape, checked: imports run one way (no cycle, function-level imports included; a stage imports
only earlier stages, `model/`, `config/` and the shared modules), modules and functions stay readable sizes, and
deprecated names are removed in the release their table names."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "adapt"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80

# A module may import only modules of its own floor or lower ones. Floors follow the pipeline
# (source → convert → train/sft → sample → eval → push); `cli` and `__init__` sit on top.
FLOORS = [
    # `adapt` itself (`__version__`; its exports load lazily, through importlib, on the top floor's behalf)
    ("adapt.errors", "adapt.ranges", "adapt.outputs", "adapt.safetensors_io", "adapt.sources", "adapt.deprecations",
     "adapt.attention", "adapt"),
    ("adapt.model",),
    ("adapt.config",),
    ("adapt.checkpoint",),
    ("adapt.conversion",),
    ("adapt.training",),
    ("adapt.sampling",),
    ("adapt.serving",),
    ("adapt.evaluation",),
    ("adapt.hub",),
    ("adapt.cli", "adapt.__main__"),  # entry points
]

# "module.function": why it stays longer than MAX_FUNCTION_LINES (each one a candidate for splitting)
LONG_FUNCTIONS: dict[str, str] = {}
# module: why it stays longer than MAX_MODULE_LINES
LONG_MODULES = {
    "adapt.model.sampling_masked_diffusion": "remote code: the decoding core is one file in every checkpoint",
    "adapt.model.block_masked_diffusion": "remote code: every block layout's mask (flex included, issue 30; the clean "
        "stream's rule, issue 26) and block decoding; splitting the decoding half into its own remote-code file "
        "changes every checkpoint's file list (MODEL_FILES, upgrade), left for the next release",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of the package that `name` imports, at any depth of the file (functions, TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import submodule` imports the submodule
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import adapt.x.y` names a module or a package
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _floor(name: str) -> int:
    best = None
    for i, members in enumerate(FLOORS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and (best is None or len(m) > best[1]):
                best = (i, len(m))
    assert best is not None, f"{name} is on no floor: add it to FLOORS in tests/test_structure.py"
    return best[0]


def test_no_import_cycle():
    """Tarjan's strongly connected components of the import graph: each must be a single module."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles inside adapt/: {cycles}"


def test_imports_run_down_the_pipeline():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if _floor(b) > _floor(a))
    assert not upward, f"imports from a later stage (see FLOORS): {upward}"


def test_model_imports_nothing_else_of_the_package():
    """adapt/model/ is copied into checkpoints: it may import only torch, transformers and itself."""
    outside = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() if a.startswith("adapt.model")
                     for b in targets if not b.startswith("adapt.model"))
    assert not outside, outside


def test_module_sizes():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES and name not in LONG_MODULES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them, or add a reason to LONG_MODULES): {long}"


def test_function_sizes():
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_FUNCTIONS:
                    long[f"{name}.{node.name}"] = n
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (split them, or add a reason to "
                      f"LONG_FUNCTIONS): {long}")


@pytest.mark.parametrize("table", [LONG_FUNCTIONS, LONG_MODULES])
def test_allowlists_hold_only_what_is_still_long(table):
    """An entry whose function or module has shrunk (or gone) leaves the allowlist."""
    for key in table:
        module = key if key in MODULES else key.rpartition(".")[0]
        assert module in MODULES, f"{key}: no such module"
        source = MODULES[module].read_text()
        if key == module:
            assert len(source.splitlines()) > MAX_MODULE_LINES, f"{key} is short now: drop it from the allowlist"
            continue
        lengths = [n.end_lineno - n.lineno + 1 for n in ast.walk(ast.parse(source))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == key.rpartition(".")[2]]
        assert lengths and max(lengths) > MAX_FUNCTION_LINES, f"{key} is short now: drop it from the allowlist"


def _overdue_renames(rows, version: str, code: str) -> list[str]:
    """What is wrong with `rows` (`adapt.deprecations.Renamed`) at release `version`, with `code` the package's
    source outside the table: a row whose release has come, or one whose old name no code reads any more."""
    from packaging.version import Version

    problems = []
    for row in rows:
        if Version(version) >= Version(row.removed_in):
            problems.append(f"{row.old} ({row.where}) goes in {row.removed_in}: remove its row in "
                            "adapt/deprecations.py and the code that accepts it")
        elif row.old not in code and row.old.split(".")[-1] not in code:
            problems.append(f"{row.old}: nothing handles it any more")
    return problems


def test_deprecation_table_is_honoured():
    """A renamed name is accepted until its `removed_in` release; reaching that release fails here, so the release
    deletes the row and its handling. Every row is still read somewhere in the package (its old name, or the old
    name's last dotted part, appears in the code)."""
    import adapt
    from adapt.deprecations import RENAMED, Renamed

    code = "\n".join(path.read_text() for name, path in MODULES.items() if name != "adapt.deprecations")
    assert _overdue_renames(RENAMED, adapt.__version__, code) == []
    # the check itself, on rows of its own: due at its release and after, fine before it while the code reads it
    row = Renamed("data.old_key", "data.new_key", "recipe key", "0.9.0")
    assert _overdue_renames([row], "0.8.5", "node['old_key']") == []
    for version in ("0.9.0", "1.0.0"):
        [problem] = _overdue_renames([row], version, "old_key")
        assert "data.old_key (recipe key) goes in 0.9.0" in problem
    assert _overdue_renames([row], "0.8.5", "new_key only") == ["data.old_key: nothing handles it any more"]
