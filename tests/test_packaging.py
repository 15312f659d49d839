"""pyproject.toml as the build backend reads it: no deprecation warning on every install."""
from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.unit

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
SPDX_SETUPTOOLS = Version("77")  # the first setuptools that takes `license` as an SPDX expression (PEP 639)


def test_license_is_an_spdx_expression_that_the_required_setuptools_accepts() -> None:
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "Apache-2.0"  # a table ({text = ...}) is deprecated: warns on every build
    (setuptools,) = [Requirement(r) for r in data["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    floor = min((Version(spec.version) for spec in setuptools.specifier if spec.operator in (">=", "==", "~=")), default=Version("0"))
    assert floor >= SPDX_SETUPTOOLS, f"{setuptools}: an older setuptools rejects the SPDX string"


def test_setuptools_applies_pyproject_without_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the build backend does with pyproject.toml, in process: the license table's deprecation
    warning (printed by every `pip install`) would be an error here."""
    setuptools = pytest.importorskip("setuptools")
    if Version(setuptools.__version__) < SPDX_SETUPTOOLS:
        pytest.skip(f"setuptools {setuptools.__version__} here predates the SPDX form (the build uses its own, >= 77)")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(PYPROJECT.parent)  # package-dir entries are relative to the project
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), PYPROJECT)
    assert dist.metadata.license_expression == "Apache-2.0"


def test_every_source_package_is_in_the_distribution() -> None:
    """`packages` is an explicit list (the import names are mapped onto directories): a package directory
    left out would import from a checkout's editable install and be missing from a built wheel."""
    setuptools_table = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    listed = set(setuptools_table["packages"])
    root = PYPROJECT.parent
    for name, source in setuptools_table["package-dir"].items():
        for init in (root / source).rglob("__init__.py"):
            relative = init.parent.relative_to(root / source)
            package = ".".join([name, *relative.parts])
            if name == "openinfer.client" and relative.parts[:1] == ("wire",):
                continue  # client/wire/ is mapped under its own name, openinfer.wire
            assert package in listed, f"{init.parent} is not in pyproject.toml's packages: add {package!r}"
