"""The extension as Slicer's build installs it: segments from the installed tree alone.

The real ``CMakeLists.txt`` is configured against ``slicer_cmake_stub/`` (a stand-in of Slicer's
CMake package whose macros copy and install files the way Slicer's and CTK's do), built and
installed into a temporary prefix. A fresh Python that sees only that tree and the third-party
packages then imports ``voila``, finds the demo model and the sample CT beside it and segments.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from voila.resources import DEMO_MODEL, SAMPLE_CT, VOCABULARY

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).resolve().parent / "slicer_cmake_stub"
VOILA_PACKAGE = REPO / "VOILATraining" / "voila"
MODULE = REPO / "VOILASegmenter"
SCRIPTED_MODULES = "lib/Slicer-5.8/qt-scripted-modules"
CMAKE = shutil.which("cmake")

pytestmark = pytest.mark.skipif(
    CMAKE is None, reason="cmake is not installed, so the extension cannot be built"
)

SEGMENT_FROM_INSTALL = """
import json, sys
import voila
from voila.data.io import read_image
from voila.resources import SAMPLE_CT, resource_path, resources_dir
from VOILASegmenterLib.environment import dependency_report, ensure_voila_importable

segmenter = voila.Segmenter.load()
image, affine = read_image(resource_path(SAMPLE_CT))
result = segmenter.segment(image, affine, ["liver"], heatmap=False)
print(json.dumps({
    "voila": voila.__file__,
    "resources": str(resources_dir()),
    "model": str(segmenter.model_path),
    "image_shape": list(image.shape),
    "labelmap_shape": list(result.labelmap.shape),
    "liver_found": result.prompts[0].found,
    "liver_voxels": int((result.labelmap == 1).sum()),
    "voila_importable": ensure_voila_importable(),
    "dependency_report": dependency_report(),
    "sys_path": sys.path,
}))
"""


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert completed.returncode == 0, (
        f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )
    return completed


@pytest.fixture(scope="module")
def extension(tmp_path_factory) -> dict[str, Path]:
    """Build and install folders of the extension built against the Slicer stand-in."""
    root = tmp_path_factory.mktemp("extension")
    build, prefix = root / "build", root / "install"
    _run(
        CMAKE,
        "-S",
        str(REPO),
        "-B",
        str(build),
        f"-DSlicer_DIR={STUB}",
        f"-DPYTHON_EXECUTABLE={sys.executable}",
        "-DBUILD_TESTING=ON",
    )
    _run(CMAKE, "--build", str(build), "--parallel", "2")
    _run(CMAKE, "--install", str(build), "--prefix", str(prefix))
    return {"build": build / SCRIPTED_MODULES, "install": prefix / SCRIPTED_MODULES, "root": root}


def _shipped_files() -> dict[str, Path]:
    """Path in the scripted-modules folder -> source file, for everything the extension must ship."""
    files = {"VOILASegmenter.py": MODULE / "VOILASegmenter.py"}
    files.update({f"VOILASegmenterLib/{p.name}": p for p in (MODULE / "VOILASegmenterLib").glob("*.py")})
    package = [*VOILA_PACKAGE.rglob("*.py"), *VOILA_PACKAGE.glob("presets/*.yaml")]
    files.update({f"voila/{p.relative_to(VOILA_PACKAGE).as_posix()}": p for p in package})
    terminology = [
        *(REPO / "Resources" / "Terminology").glob("*.json"),
        *(REPO / "Resources" / "Terminology").glob("*.csv"),
    ]
    for resource in [VOCABULARY, DEMO_MODEL, SAMPLE_CT, *(f"Terminology/{p.name}" for p in terminology)]:
        files[f"Resources/{resource}"] = REPO / "Resources" / resource
    for resource in ("Icons/VOILASegmenter.png", "UI/VOILASegmenter.ui", "model_registry.json"):
        files[f"Resources/{resource}"] = MODULE / "Resources" / resource
    return files


def _missing_or_different(folder: Path) -> list[str]:
    return [
        relative
        for relative, source in _shipped_files().items()
        if not (folder / relative).is_file() or not filecmp.cmp(folder / relative, source, shallow=False)
    ]


def test_the_install_holds_the_module_the_whole_voila_package_and_its_resources(extension):
    assert _missing_or_different(extension["install"]) == []
    installed_package = sorted(
        p.relative_to(extension["install"]).as_posix() for p in extension["install"].glob("voila/**/*.py")
    )
    assert installed_package == sorted(
        k for k in _shipped_files() if k.startswith("voila/") and k.endswith(".py")
    )


def test_the_build_tree_has_the_same_layout_so_ctest_runs_from_it(extension):
    assert _missing_or_different(extension["build"]) == []


def test_the_installed_tree_alone_imports_voila_finds_its_model_and_segments_the_sample_ct(extension):
    installed = extension["install"].resolve()
    site_packages = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VOILA_RESOURCES")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(installed), *site_packages]),
        PYTHONNOUSERSITE="1",
        OMP_NUM_THREADS="2",
    )
    # -S: the venv's .pth files, among them the editable install of voila, are not processed.
    completed = _run(
        sys.executable, "-S", "-c", SEGMENT_FROM_INSTALL, env=env, cwd=extension["root"], timeout=300
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])

    assert Path(report["voila"]).resolve().is_relative_to(installed)
    assert Path(report["resources"]).resolve() == installed / "Resources"
    assert Path(report["model"]).resolve() == installed / "Resources" / DEMO_MODEL
    assert not any(str(REPO / "VOILATraining") in entry for entry in report["sys_path"])
    assert report["liver_found"] and report["liver_voxels"] > 0
    assert report["labelmap_shape"] == report["image_shape"]
    assert report["voila_importable"]
    assert report["dependency_report"] is None
