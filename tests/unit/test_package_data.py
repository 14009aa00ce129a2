"""pyproject.toml lists the wheel's packages by hand (one is mapped: migrations/ ships as
engine/migrations); these checks keep that list and the package data in step with the
checkout, so a new subpackage or a new static file cannot be left out of an install.
tests/integration/test_packaging.py installs the wheel and runs it; this is the quick
check that names the missing file."""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("engine", "workers", "dashboard", "chaos")


def setuptools_config() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        config: dict[str, Any] = tomllib.load(f)["tool"]["setuptools"]
    return config


def package_dir(package: str, mapping: dict[str, str]) -> Path:
    """Where setuptools reads `package` from: the longest mapped prefix, else its own path."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return ROOT / mapping[prefix] / Path(*parts[i:])
    return ROOT / Path(*parts)


def source_dirs() -> set[Path]:
    """Every directory of the checkout that holds Python modules the program runs."""
    roots = [ROOT / name for name in (*TOP_LEVEL, "migrations")]
    return {
        path.parent
        for root in roots
        for path in root.rglob("*.py")
        if "__pycache__" not in path.parts
    }


def test_every_module_directory_is_a_listed_package() -> None:
    config = setuptools_config()
    shipped = {package_dir(p, config.get("package-dir", {})) for p in config["packages"]}
    assert all(d.is_dir() for d in shipped), sorted(str(d) for d in shipped if not d.is_dir())
    missing = sorted(str(d.relative_to(ROOT)) for d in source_dirs() - shipped)
    assert missing == [], "add these to [tool.setuptools] packages in pyproject.toml"


def test_migrations_ship_inside_the_engine() -> None:
    """engine/migrate.py looks for engine/migrations when installed."""
    config = setuptools_config()
    assert package_dir("engine.migrations", config["package-dir"]) == ROOT / "migrations"
    assert {"engine.migrations", "engine.migrations.versions"} <= set(config["packages"])


def test_every_data_file_is_package_data() -> None:
    """Each file in a package that is not a module (SQL, the alembic template, the
    dashboard's assets) matches a package-data glob, expanded the way setuptools does
    (``glob`` relative to the package's directory)."""
    config = setuptools_config()
    mapping = config.get("package-dir", {})
    shipped: set[Path] = set()
    for package, patterns in config.get("package-data", {}).items():
        base = package_dir(package, mapping)
        for pattern in patterns:
            shipped.update(base / match for match in glob.glob(pattern, root_dir=base))
    data = {
        path
        for root in (*TOP_LEVEL, "migrations")
        for path in (ROOT / root).rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert data, "no data files found: the check looks in the wrong place"
    missing = sorted(str(p.relative_to(ROOT)) for p in data - shipped)
    assert missing == [], "add these to [tool.setuptools.package-data] in pyproject.toml"
