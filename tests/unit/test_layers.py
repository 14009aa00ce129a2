"""The arrows between the top-level packages point one way: `workers`, `dashboard` and
`chaos` use `engine`; `engine` uses none of them (STYLE.md, "Arrows point down").

Read from the source with `ast`, so an import anywhere in a module counts (also one inside
a function), and so does a dotted module path written as a string (what
``importlib.import_module`` or ``PGDAG_TOOLS``-style loading would import).

One module is allowed above the rest: ``engine/__main__.py``, the program (``python -m
engine``, the ``pgdag`` script), which composes the server from all three. Nothing may
import it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> the first-party packages it may use besides itself
ALLOWED: dict[str, frozenset[str]] = {
    "engine": frozenset(),
    "workers": frozenset({"engine"}),
    "dashboard": frozenset({"engine"}),
    "chaos": frozenset({"engine"}),
}
# The composition root: the program, which may see every layer.
PROGRAM = ROOT / "engine" / "__main__.py"
PROGRAM_MAY_USE = frozenset({"engine", "workers", "dashboard"})
# A string that is nothing but a first-party module path ("workers.tools.builtin",
# "dashboard.routes:routes") names a module to import by name.
_MODULE_STRING = re.compile(r"(engine|workers|dashboard|chaos)(\.\w+)+(:\w+)?")


@dataclass(frozen=True)
class Use:
    """One use of a first-party package: where, and what was imported."""

    path: Path
    line: int
    target: str

    @property
    def package(self) -> str:
        return self.target.split(".")[0].split(":")[0]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} uses {self.target}"


def uses(path: Path) -> list[Use]:
    """Every first-party module `path` imports, statically or by a module-path string."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Use] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(Use(path, node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend(Use(path, node.lineno, f"{node.module}.{a.name}") for a in node.names)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.fullmatch(node.value)
        ):
            found.append(Use(path, node.lineno, node.value))
    return [u for u in found if u.package in ALLOWED]


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def violations(package: str) -> list[str]:
    """The uses in `package` that its layer does not allow, one line each."""
    bad = []
    for path in modules(package):
        allowed = PROGRAM_MAY_USE if path == PROGRAM else ALLOWED[package] | {package}
        bad.extend(str(use) for use in uses(path) if use.package not in allowed)
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_arrows_point_down(package: str) -> None:
    assert modules(package), f"no modules found in {package}/"
    assert violations(package) == []


def test_nothing_imports_the_program() -> None:
    """The composition root stays a leaf: were an engine module to import it, the engine
    would reach the dashboard and the workers through it."""
    importers = [
        str(use)
        for package in ALLOWED
        for path in modules(package)
        for use in uses(path)
        if use.target in ("engine.__main__", "engine.__main__.main")
        or use.target.startswith("engine.__main__.")
    ]
    assert importers == []


def test_the_check_sees_every_kind_of_use(tmp_path: Path) -> None:
    """`uses` finds a plain import, a from-import inside a function and a module-path
    string, and ignores relative imports, third-party modules and prose."""
    source = tmp_path / "sample.py"
    source.write_text(
        "import dashboard.routes\n"
        "from . import sibling\n"
        "import httpx\n"
        "def f():\n"
        "    from workers.tools import builtin\n"
        "TOOLS = ('workers.tools.builtin',)\n"
        "APP = 'dashboard.routes:routes'\n"
        "DOC = 'see workers.tools.builtin for the tools'\n",
        encoding="utf-8",
    )
    found = sorted((u.line, u.target) for u in uses(source))
    assert found == [
        (1, "dashboard.routes"),
        (5, "workers.tools.builtin"),
        (6, "workers.tools.builtin"),
        (7, "dashboard.routes:routes"),
    ]
