"""The house's shape, read from the code itself (ast; nothing is imported or run).

Folders are floors: data flows down them, so a module may import its own floor's modules (without
a cycle) and the floors below, never one above. Function-local imports are few, each commented,
and only where they buy start-up time for a heavy optional dependency.
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sparsity_app"
# bottom to top; the package's own __init__ / __main__ stand above them all
FLOORS = ("core", "prune", "kernels", "measure", "model", "accuracy", "runs", "serve", "bench", "cli")
MAX_LOCAL_IMPORTS = 30


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def _floor(module: str) -> int:
    top = module.split(".")[0]
    return FLOORS.index(top) if top in FLOORS else len(FLOORS)


def _imports(path: pathlib.Path) -> list[tuple[str, ast.AST, bool]]:
    """(imported project module, the statement, inside a function?) for every project import."""
    tree = ast.parse(path.read_text())
    local = {id(s) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for s in ast.walk(f) if isinstance(s, (ast.Import, ast.ImportFrom))}
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsity_app"):
            assert node.level == 0, f"{path}: relative import {ast.unparse(node)}"
            base = node.module[len("sparsity_app."):] if node.module != "sparsity_app" else ""
            for alias in node.names:
                sub = f"{base}.{alias.name}".strip(".")
                found.append((sub if sub in modules else base or "__init__", node, id(node) in local))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sparsity_app."):
                    found.append((alias.name[len("sparsity_app."):], node, id(node) in local))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        me = _module(path)
        graph.setdefault(me, set()).update(m for m, _, _ in _imports(path) if m != me)
    return graph


def test_no_import_cycle():
    graph, state, stack = _graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_arrow_runs_up_the_floors():
    upward = [f"{me} -> {dep}" for me, deps in _graph().items() for dep in deps
              if _floor(dep) > _floor(me)]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(sorted(upward))


def test_the_engine_never_imports_streamlit():
    engine = [p for p in PACKAGE.rglob("*.py") if _module(p).split(".")[0] not in ("bench", "cli")]
    offenders = [str(p) for p in engine for node in ast.walk(ast.parse(p.read_text()))
                 if isinstance(node, (ast.Import, ast.ImportFrom))
                 and any(n.startswith("streamlit") for n in
                         ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]))]
    assert not offenders


def test_function_local_imports_are_few_and_each_says_why():
    local, uncommented = [], []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().split("\n")
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for s in ast.walk(f):
                    if isinstance(s, (ast.Import, ast.ImportFrom)):
                        local.append(f"{path.name}:{s.lineno}")
                        here, above = lines[s.lineno - 1], lines[s.lineno - 2].strip()
                        if "#" not in here and not above.startswith("#"):
                            uncommented.append(f"{path.relative_to(PACKAGE)}:{s.lineno}: {here.strip()}")
    assert len(local) <= MAX_LOCAL_IMPORTS, f"{len(local)} function-local imports (at most {MAX_LOCAL_IMPORTS})"
    assert not uncommented, "a function-local import must say why (a comment on it or above it):\n" + \
        "\n".join(uncommented)


# What a door imports to resolve a request and answer it from the cache: none of it may load a
# compiler or a deep-learning framework (a cached result shows in well under 2 s).
LIGHT = ("sparsity_app.cli.main", "sparsity_app.runs.layer", "sparsity_app.runs.model", "sparsity_app.runs.recover",
         "sparsity_app.runs.sensitivity", "sparsity_app.serve.links",
         "sparsity_app.serve.jobs", "sparsity_app.serve.analysis")
HEAVY = ("tvm", "torch", "transformers", "sklearn", "onnxruntime")


def test_the_cached_path_loads_no_compiler_and_no_framework():
    import subprocess
    import sys

    code = (f"import sys\nfor m in {LIGHT!r}: __import__(m)\n"
            f"print(' '.join(h for h in {HEAVY!r} if h in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not loaded, f"importing the doors' light path loads {loaded}"
