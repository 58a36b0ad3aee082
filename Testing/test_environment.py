"""First-run setup (``VOILASegmenterLib.environment``) without Slicer: what it installs and reports.

Pythons that lack packages are real ones: this interpreter started with ``-S`` and a chosen path.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "VOILASegmenter"
if str(MODULE) not in sys.path:
    sys.path.insert(0, str(MODULE))  # as Slicer imports the module's library

from VOILASegmenterLib import environment  # noqa: E402

REPORT = """
import importlib.util, json
from VOILASegmenterLib import environment
before = importlib.util.find_spec("voila") is not None
importable = environment.ensure_voila_importable()
import_ok = True
try:
    import voila
    where = voila.__file__
except ImportError:
    import_ok, where = False, None
print(json.dumps({"before": before, "importable": importable, "import_ok": import_ok, "voila": where,
                  "missing": environment.missing_packages(), "report": environment.dependency_report()}))
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(requirement: str) -> tuple[str, str]:
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return _canonical(name), requirement[len(name) :].strip()


def _bare_python(module_parent: Path, tmp_path: Path) -> dict:
    """Run REPORT in a Python that sees only the standard library and ``module_parent``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(module_parent), PYTHONNOUSERSITE="1")
    completed = subprocess.run(
        [sys.executable, "-S", "-c", REPORT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_every_runtime_dependency_of_voila_is_installed_by_setup_or_shipped_by_slicer():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    pyproject = tomllib.loads((REPO / "VOILATraining" / "pyproject.toml").read_text())
    required = dict(_split(r) for r in pyproject["project"]["dependencies"])
    installed_by_setup = dict(_split(r) for r in environment.PYTHON_PACKAGES.values())
    from_slicer = {_canonical(name) for name in environment.PROTECTED_DISTRIBUTIONS}
    from_pytorch_extension = {_canonical(name) for name in environment.TORCH_DISTRIBUTIONS}

    assert set(required) == set(installed_by_setup) | (from_slicer & set(required)) | from_pytorch_extension
    assert not set(installed_by_setup) & (from_slicer | from_pytorch_extension)
    assert {name: required[name] for name in installed_by_setup} == installed_by_setup
    assert required["torch"] == environment.TORCH_REQUIREMENT


def test_each_import_name_setup_checks_belongs_to_the_distribution_it_installs():
    distributions = importlib.metadata.packages_distributions()
    for import_name, requirement in environment.PYTHON_PACKAGES.items():
        assert _split(requirement)[0] in {_canonical(d) for d in distributions.get(import_name, [])}, (
            import_name
        )


def test_nothing_is_reported_when_every_package_is_there():
    assert environment.missing_packages() == []
    assert environment.dependency_report() is None


def test_a_source_checkout_makes_voila_importable_and_names_the_missing_packages_without_torch(tmp_path):
    result = _bare_python(MODULE, tmp_path)

    assert not result["before"]
    assert result["importable"] and result["import_ok"]
    assert Path(result["voila"]).resolve().is_relative_to(REPO / "VOILATraining" / "voila")
    assert result["missing"][:2] == [f"torch{environment.TORCH_REQUIREMENT}", "torchvision"]
    assert set(environment.PYTHON_PACKAGES.values()) <= set(result["missing"])
    for expected in ("torch>=2.1", "monai>=1.3", "press Segment", "'PyTorch' extension"):
        assert expected in result["report"]


def test_a_module_without_the_voila_package_says_to_reinstall_the_extension_and_installs_no_voila(tmp_path):
    lonely = tmp_path / "qt-scripted-modules"
    shutil.copytree(
        MODULE / "VOILASegmenterLib",
        lonely / "VOILASegmenterLib",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    result = _bare_python(lonely, tmp_path)

    assert not result["importable"] and not result["import_ok"]
    assert "reinstall the VOILA extension" in result["report"]
    assert not any("voila" in requirement for requirement in result["missing"])


def test_pip_holds_protected_versions_and_adds_only_what_is_missing():
    arguments = environment.pip_arguments(["monai>=1.3"], {"numpy": "1.26.4", "vtk": None})
    assert arguments == ["monai>=1.3", "numpy==1.26.4", "--upgrade-strategy", "only-if-needed"]
