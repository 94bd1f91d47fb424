"""The project files a stage imports, followed transitively, against the code dependencies dvc.yaml declares.

`python tests/deps.py` prints, per stage, the files missing from its deps and the declared code deps it no longer
imports; tests/test_deps.py fails on a missing one. Imports are read from the source (ast), so an import inside a
function counts, and one under `if TYPE_CHECKING:` does not (it never runs). A family's package is imported by name
at run time (families.get): the stages that ask their family (stages.common.FAMILY_STAGES) also run the code of
families/<method.name>/, which dvc.yaml declares as `families/${method.name}` (docs/design.md, "Dependencies").
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "families")
# Files that cannot change an output: where runs are recorded (MLflow, its spool) and the error class.
OUTPUT_NEUTRAL = ("pipeline/tracking.py", "pipeline/spool.py", "pipeline/errors.py")
FAMILY_DEP = "families/${method.name}"


def _module_file(name: str) -> Path | None:
    """The file of a project module (a package's __init__.py), or None for a module outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    """Every module an `import` or `from ... import` of this file names (a `from X import y` also names X.y, which
    is a module when y is one); imports under `if TYPE_CHECKING:` are left out."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


@lru_cache(maxsize=None)
def _direct(path: Path) -> frozenset[Path]:
    """The project files `path` imports directly, with the __init__.py of every package on the way."""
    package = ".".join(path.relative_to(ROOT).parts[:-1])  # of a module and of a package's __init__.py alike
    found: set[Path] = set()
    for name in _imported_names(ast.parse(path.read_text(encoding="utf-8")), package):
        pieces = name.split(".")
        for i in range(1, len(pieces) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
            f = _module_file(".".join(pieces[:i]))
            if f is not None and f != path:
                found.add(f)
    return frozenset(found)


@lru_cache(maxsize=None)
def _closure(modules: tuple[str, ...]) -> frozenset[Path]:
    todo = [f for f in (_module_file(m) for m in modules) if f is not None]
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_direct(f) - seen)
    return frozenset(seen)


def closure(*modules: str) -> set[Path]:
    """Every project file the modules run, transitively, themselves included."""
    return set(_closure(modules))


@lru_cache(maxsize=None)
def _docstring_only(path: Path) -> bool:
    """A module with nothing but a docstring (a package's marker __init__.py) runs no code that could matter."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def family_modules(name: str, stage: str) -> list[str]:
    """The modules stage `stage` of a run of family `name` imports by name: its package, and the module of its own
    body of that stage if it has one."""
    sys.path.insert(0, str(ROOT))
    try:
        import families

        family = families.get(name)
    finally:
        sys.path.remove(str(ROOT))
    return [f"families.{name}"] + ([family.stages] if stage in family.own_stages else [])


def needed(stage: str, family: str, family_stages: tuple[str, ...]) -> set[str]:
    """The files (relative paths) stage `stage` runs for a run of `family`, less the output-neutral ones."""
    files = closure(f"stages.{stage}")
    if stage in family_stages:
        files |= closure(*family_modules(family, stage))
    rel = {f.relative_to(ROOT).as_posix() for f in files if not _docstring_only(f)}
    return rel - set(OUTPUT_NEUTRAL)


def declared(dvc_yaml: dict, stage: str, family: str) -> list[str]:
    """The stage's deps in dvc.yaml with ${method.name} rendered for `family`."""
    return [d.replace("${method.name}", family) for d in dvc_yaml["stages"][stage].get("deps", [])]


def covered(path: str, deps: list[str]) -> bool:
    """Whether a dep names the file or a folder above it."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def report(dvc_yaml: dict, names: tuple[str, ...], family_stages: tuple[str, ...]) -> dict[str, dict[str, set]]:
    """{stage: {"missing": files imported but not declared, "unused": declared code files no family's run
    imports}}, over every family."""
    out = {}
    for stage in dvc_yaml["stages"]:
        missing, used = set(), set()
        for family in names:
            deps = declared(dvc_yaml, stage, family)
            files = needed(stage, family, family_stages)
            missing |= {f for f in files if not covered(f, deps)}
            used |= {d for d in deps for f in files if covered(f, [d])}
        code = {d for d in dvc_yaml["stages"][stage].get("deps", [])
                if d.split("/")[0] in PACKAGES and d != FAMILY_DEP}
        out[stage] = {"missing": missing, "unused": code - used}
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    import families
    from stages.common import FAMILY_STAGES

    found = report(yaml.safe_load((ROOT / "dvc.yaml").read_text()), families.NAMES, FAMILY_STAGES)
    for stage, r in found.items():
        for key in ("missing", "unused"):
            if r[key]:
                print(f"{stage}: {key}: {', '.join(sorted(r[key]))}")


if __name__ == "__main__":
    main()
