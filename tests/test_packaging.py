"""The distribution ships every package: a non-editable install must not lose a module."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    tomllib = pytest.importorskip("tomli")

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


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Test\n", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"```bash\n(.*?)\n```", section, re.DOTALL)
    return command


def test_readme_test_command_pins_torch_before_the_test_extra():
    steps = [shlex.split(step) for step in _readme_test_command().split("&&")]
    installs = [step for step in steps if step[:2] == ["pip", "install"]]
    torch_step = next(
        i for i, step in enumerate(installs) if any(a.startswith("torch") for a in step)
    )
    extra_step = next(i for i, step in enumerate(installs) if ".[test]" in step)
    assert torch_step < extra_step
    (pin,) = [a for a in installs[torch_step] if a.startswith("torch")]
    assert re.fullmatch(r"torch==[\d.]+", pin)  # an exact release: a range admits the CUDA build
    assert steps[-1][0] == "pytest"


def test_ci_runs_the_readme_test_command():
    ci_steps = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["python3", "-m"]:
            ci_steps.append([w for w in words[2:] if w != "--quiet"])
    readme_steps = [shlex.split(step) for step in _readme_test_command().split("&&")]
    positions = [ci_steps.index(step) for step in readme_steps]  # each README step, in CI
    assert positions == sorted(positions)
