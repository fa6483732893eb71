"""The structure of the package, held against the code: the import-layer rule of docs/architecture.md,
no import cycles (function-local imports included), and dvc.yaml's deps covering each stage's code."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"

#: The layers, bottom to top (docs/architecture.md). A module may import modules of its own layer or below.
LAYERS: dict[int, tuple[str, ...]] = {
    1: ("pipeline", "pipeline.errors", "pipeline.config", "pipeline.fileio", "pipeline.formats", "pipeline.metrics"),
    2: ("pipeline.nets", "pipeline.coregister"),
    3: (
        "pipeline.imagery",
        "pipeline.pair",
        "pipeline.tiling",
        "pipeline.predictors",
        "pipeline.detect",
        "pipeline.vectorize",
        "pipeline.ledger",
        "pipeline.synth",
    ),
    4: ("pipeline.publish",),
    5: ("pipeline.model", "pipeline.cli"),
}
#: The demo town is a generator for the demo stage and for training: only these may import it.
SYNTH_USERS = ("pipeline.synth", "pipeline.model", "pipeline.cli")
#: Modules whose changes need not rerun a stage (messages and the command line itself).
NOT_A_STAGE_DEP = {"pipeline/__init__.py", "pipeline/cli.py", "pipeline/errors.py"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, layer = "", 0
    for k, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, layer = prefix, k
    return layer


def resolve(name: str) -> str | None:
    """The module file an imported name lives in (``pipeline.ledger.view`` or its package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> Iterator[tuple[str, int]]:
    """Every pipeline module ``module`` imports, anywhere in the file, with the line."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline"):
                    target = resolve(alias.name)
                    if target:
                        yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("pipeline"):
                continue
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else resolve(base)
                if target:
                    yield target, node.lineno


GRAPH = {m: {t for t, _ in imports(m) if t != m} for m in MODULES}


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if layer_of(m) == 0] == []


def test_imports_follow_the_layers() -> None:
    bad = []
    for module in MODULES:
        for target, line in imports(module):
            if layer_of(target) > layer_of(module):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} (layer {layer_of(target)})")
    assert bad == [], "imports up the layers:\n" + "\n".join(bad)


def test_only_the_model_and_the_command_line_use_the_demo_town() -> None:
    bad = [
        f"{module} imports {target}"
        for module in MODULES
        for target, _ in imports(module)
        if target.startswith("pipeline.synth") and not module.startswith(SYNTH_USERS)
    ]
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_even_through_function_local_imports() -> None:
    # a package's __init__ that re-exports its submodules is its face, not a participant
    graph = {
        m: {t for t in ts if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
        for m, ts in GRAPH.items()
    }
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# --------------------------------------------------------------------------- dvc.yaml against the code


CLICK_DECORATORS = ("command", "group")


def _cli_commands() -> dict[str, set[str]]:
    """``scarwatch`` subcommand name -> the pipeline modules its function imports."""
    tree = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        name = None
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr in CLICK_DECORATORS:
                given = [a.value for a in dec.args if isinstance(a, ast.Constant)]
                given += [k.value.value for k in dec.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)]
                name = given[0] if given else node.name
                owner = dec.func.value
                if isinstance(owner, ast.Name) and owner.id != "cli":  # a group's subcommand: "ledger build"
                    name = f"{owner.id} {name}"
        if name is None:
            continue
        used = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("pipeline"):
                for alias in sub.names:
                    full = f"{sub.module}.{alias.name}"
                    target = resolve(full) if full in MODULES else resolve(sub.module or "")
                    if target:
                        used.add(target)
        out[str(name).replace("_", "-")] = used
    return out


def _closure(modules: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(GRAPH[m])
        # importing a submodule runs its packages' __init__ first
        parent = m.rpartition(".")[0]
        while parent:
            if parent in MODULES:
                todo.append(parent)
            parent = parent.rpartition(".")[0]
    return seen


def _stages() -> Iterator[tuple[str, str, list[str]]]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        yield name, body["cmd"], [str(d) if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]


def _subcommands(cmd: str) -> list[str]:
    out = []
    for part in cmd.replace("&&", "\n").splitlines():
        words = part.split()
        if "scarwatch" in words:
            rest = [w for w in words[words.index("scarwatch") + 1 :] if not w.startswith("-")]
            if len(rest) > 1 and " ".join(rest[:2]) in _cli_commands():  # a group's subcommand
                out.append(" ".join(rest[:2]))
            elif rest:
                out.append(rest[0])
    return out


STAGES = list(_stages())


@pytest.mark.parametrize(("stage", "cmd", "deps"), STAGES, ids=[s[0] for s in STAGES])
def test_dvc_deps_cover_the_code_each_stage_runs(stage: str, cmd: str, deps: list[str]) -> None:
    commands = _cli_commands()
    subs = _subcommands(cmd)
    assert subs and all(s in commands for s in subs), f"{stage}: {cmd!r} names no known scarwatch command"
    files = {str(MODULES[m].relative_to(ROOT)) for s in subs for m in _closure(commands[s])} - NOT_A_STAGE_DEP
    covered = [d.rstrip("/") for d in deps]
    missing = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in covered))
    assert missing == [], f"dvc.yaml stage {stage!r} runs {missing} but does not depend on them"


def test_the_dvc_check_sees_a_missing_dep() -> None:
    commands = _cli_commands()
    files = {str(MODULES[m].relative_to(ROOT)) for m in _closure(commands["align"])}
    assert {"pipeline/imagery.py", "pipeline/pair.py", "pipeline/coregister.py"} <= files


def test_every_code_dep_of_dvc_yaml_exists() -> None:
    stale = [
        (stage, d) for stage, _, deps in STAGES for d in deps if d.startswith("pipeline") and not (ROOT / d).exists()
    ]
    assert stale == []
