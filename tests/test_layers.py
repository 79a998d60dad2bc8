"""Import layers (docs/architecture.md), checked on the source: every ``import`` and
``from ... import`` statement of the runtime packages, at any depth (function bodies too),
relative ones resolved.

- clip_model imports nothing from pipeline or testkit (and not Ray);
- pipeline stages import no scheduler, graph or job module;
- schedulers import no particular stage (they run whatever graph they are given);
- nothing in clip_model or pipeline imports the test rig (testkit) or the tests.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import REPO_ROOT, subprocess_env


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a.b import c`` gives ``a.b``
    and ``a.b.c``, since c may be a module)."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _files(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def _offenders(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for name in sorted(imports_of(f)):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{f.relative_to(REPO_ROOT)} imports {name}")
    return bad


def test_the_scan_finds_relative_and_nested_imports(tmp_path: Path) -> None:
    pkg = REPO_ROOT / "pipeline" / "stages"
    assert "pipeline.stages.base" in imports_of(pkg / "embed.py")  # from pipeline.stages.base import ...
    assert "clip_model.config" in imports_of(REPO_ROOT / "clip_model" / "__init__.py")  # from .config import
    assert "torch" in imports_of(pkg / "embed.py")  # imported inside a method


def test_clip_model_imports_no_pipeline_testkit_or_ray() -> None:
    assert _offenders(_files("clip_model"), ("pipeline", "testkit", "tests", "ray")) == []


def test_clip_model_names_no_pipeline_or_testkit_module_even_as_a_string() -> None:
    # A "module:function" string is an import in disguise (a recipe once named its data
    # provider that way).
    bad = [str(f.relative_to(REPO_ROOT)) for f in _files("clip_model")
           if "pipeline." in f.read_text() or "testkit." in f.read_text()]
    assert bad == []


def test_stages_import_no_scheduler_graph_or_job() -> None:
    banned = ("pipeline.schedulers", "pipeline.graph", "pipeline.job", "pipeline.download_job", "pipeline.global_pass")
    assert _offenders(_files("pipeline/stages"), banned) == []


def test_schedulers_import_no_particular_stage() -> None:
    stages = tuple(f"pipeline.stages.{p.stem}" for p in _files("pipeline/stages") if p.stem not in ("base", "__init__"))
    assert _offenders(_files("pipeline/schedulers"), stages) == []


def test_the_runtime_imports_no_test_rig() -> None:
    assert _offenders(_files("pipeline") + _files("clip_model"), ("testkit", "tests")) == []


@pytest.mark.parametrize("module", ["pipeline.job", "pipeline.cli", "pipeline.download_job", "pipeline.takedown"])
def test_importing_an_entry_point_loads_no_test_rig(module: str) -> None:
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('testkit', 'tests')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=subprocess_env())
