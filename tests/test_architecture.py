"""The house's rules, read from the source: imports run down the layers of
docs/architecture.md, no module imports itself round a circle, and no module takes another's
private (underscored) names. Also the contract of pyproject.toml for import-linter, where that
tool is installed."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

import emprune

PKG = Path(emprune.__file__).resolve().parent
REPO = PKG.parents[1]
#: bottom first; a module may import its own layer and those below
LAYERS = ["core", "structure", "criteria", "decide", "act", "models", "jobs", "cli"]
#: the package's front door and its plumbing sit outside the layers
OUTSIDE = {"emprune", "emprune.__main__", "emprune._compat", "emprune._version"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = ["emprune", *f.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported emprune module, imported names, line) for every import in ``path``, at any depth."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("emprune"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{mod}.{n}" not in modules]
            if rest or not subs:
                out.append((mod, rest, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("emprune")]
    return out


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _graph() -> dict[str, list[tuple[str, list[str], int]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_imports_run_down_the_layers():
    bad = []
    for mod, imps in _graph().items():
        if mod in OUTSIDE:
            continue
        me = _layer(mod)
        for target, _, line in imps:
            them = _layer(target)
            if target in OUTSIDE - {"emprune._version"} or (them is not None and me is not None and them > me):
                bad.append(f"{mod}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    edges = {m: {t for t, _, _ in imps if t != m} for m, imps in _graph().items() if m not in OUTSIDE}
    # a package's __init__ re-exporting its own submodules is not a circle of code
    edges = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in edges.items()}
    seen, stack, on, circles = {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        seen[v] = low = len(seen)
        lows[v] = low
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in seen:
                visit(w)
                lows[v] = min(lows[v], lows[w])
            elif w in on:
                lows[v] = min(lows[v], seen[w])
        if lows[v] == seen[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    lows: dict[str, int] = {}
    for v in edges:
        if v not in seen:
            visit(v)
    assert not circles, circles


def test_no_private_names_across_modules():
    bad = [f"{mod}:{line} takes {n} from {target}" for mod, imps in _graph().items()
           for target, names, line in imps for n in names
           if n.startswith("_") and not n.startswith("__") and target != mod]
    assert not bad, "\n".join(bad)


def test_import_linter_contract_matches_and_holds():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    assert cfg["layers"] == [f"emprune.{x}" for x in reversed(LAYERS)]
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (the AST tests above check the same layers)")
    out = subprocess.run(["lint-imports"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]


def test_every_recipe_has_one_row_in_the_docs_table():
    from emprune.decide.recipes import RECIPES

    text = (REPO / "docs" / "llm.md").read_text()
    rows = [m.group(1) for m in re.finditer(r"^\| `([\w-]+)` \| (?:both|prune|shrink)", text, re.M)]
    assert sorted(rows) == sorted(RECIPES), set(rows) ^ set(RECIPES)


def test_cli_options_match_the_dataclasses():
    """Every option field meant for the command line is an option of its sub-command, with the
    same default (or its ``cli_default``) and the same choices: the CLI and the API cannot drift."""
    import argparse
    import dataclasses

    from emprune.cli.main import build_parser
    from emprune.jobs import options as O

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bad = []
    for cmd, cls in (("prune", O.PruneOptions), ("shrink", O.ShrinkOptions), ("heal", O.HealOptions),
                     ("eval", O.EvalOptions), ("compare", O.CompareOptions)):
        actions = {s: a for a in sub.choices[cmd]._actions for s in a.option_strings}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta.get("cli") is False:
                continue
            flag = meta.get("flag", "--" + f.name.replace("_", "-"))
            act = actions.get(flag)
            if act is None:
                bad.append(f"{cmd} {flag}: missing")
                continue
            if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                continue
            want = meta.get("cli_default", f.default)
            if act.default != want and not (isinstance(want, tuple) and ",".join(want) == act.default):
                bad.append(f"{cmd} {flag}: default {act.default!r} != {want!r}")
            choices = meta.get("choices")
            choices = choices() if callable(choices) else choices
            if choices is not None and act.choices is not None and tuple(choices) != tuple(act.choices):
                bad.append(f"{cmd} {flag}: choices {tuple(act.choices)} != {tuple(choices)}")
    assert not bad, "\n".join(bad)


def test_old_import_paths_still_work_and_say_where_things_went():
    import importlib
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "import importlib, emprune\n"
            "from emprune._compat import MOVED\n"
            "for old, new in MOVED.items():\n"
            "    try:\n"
            "        importlib.import_module(old)\n"
            "    except DeprecationWarning as e:\n"
            "        assert new in str(e), (old, str(e))\n"
            "    else:\n"
            "        raise SystemExit(f'{old}: no warning')\n"
            "import emprune.io  # still the public name: no warning\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    sys.modules.pop("emprune.rule", None)
    with pytest.warns(DeprecationWarning, match="emprune.core.rule"):
        old = importlib.import_module("emprune.rule")
    assert old.keep_count is emprune.keep_count
    llm = importlib.import_module("emprune.llm")
    with pytest.warns(DeprecationWarning, match="emprune.from_pretrained"):
        assert llm.from_pretrained is emprune.from_pretrained


def test_functions_stay_short_and_narrow():
    """No function in src/ over 80 lines; no public function with more than 8 parameters (the
    options travel in dataclasses: PruneOptions, HealOptions, OBSSettings, Batching, ...)."""
    bad = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                a = node.args
                params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                if lines > 80 or (params > 8 and not node.name.startswith("_")):
                    bad.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}: {lines} lines, {params} parameters")
    assert not bad, "\n".join(bad)
