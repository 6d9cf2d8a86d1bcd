"""The distribution ships every package: a non-editable install must not lose a module."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).parent.parent


def test_every_package_directory_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, renamed = set(setuptools["packages"]), setuptools["package-dir"]
    on_disk = set()
    for name, folder in {"mlx_gemma4": "mlx_gemma4", **renamed}.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((name, *relative)))
    assert on_disk == listed
