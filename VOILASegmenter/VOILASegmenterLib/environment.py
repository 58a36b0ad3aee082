"""First-run Python dependencies: find what is missing and install it only after the user agreed.

The ``voila`` package itself is never installed: it ships with the extension, beside this module
(``qt-scripted-modules/voila``), and a source checkout finds it through
:func:`ensure_voila_importable`. Only third-party packages are installed. PyTorch (torch and
torchvision) comes through the PyTorch extension (``PyTorchUtils``), which picks the build that
matches the GPU driver; the rest through ``slicer.util.pip_install``. Slicer's own numpy,
SimpleITK and vtk are never replaced: their installed versions are pinned on the pip command line
(so pip fails rather than swapping them) and checked again afterwards; the PyTorch build is pinned
the same way so a later requirement cannot swap it for a PyPI build. Nothing is downloaded when
everything is present, so the module works offline once set up.

This module imports nothing beyond the standard library, so it works before any of those packages
(or ``voila``) can be imported.

    ensure_voila_importable()             # False: the extension is incomplete
    missing = missing_packages()          # e.g. ["monai>=1.3", "open_clip_torch>=2.23"]
    install_dependencies(lambda text: slicer.util.confirmOkCancelDisplay(text))
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Optional

TORCH_REQUIREMENT = ">=2.1"
# Installed together by PyTorchUtils (import name == distribution name), never by plain pip.
TORCH_DISTRIBUTIONS = ("torch", "torchvision")
# Every runtime dependency of `voila` (VOILATraining/pyproject.toml) that Slicer does not ship,
# as import name -> pip requirement; order is install order. Testing/test_environment.py keeps
# the two lists in step. Slicer also ships scipy and pydicom, so those are usually found already.
PYTHON_PACKAGES = {
    "monai": "monai>=1.3",
    "open_clip": "open_clip_torch>=2.23",
    "safetensors": "safetensors>=0.4",
    "nibabel": "nibabel>=5",
    "yaml": "pyyaml",
    "scipy": "scipy",
    "pydicom": "pydicom",
    "psutil": "psutil",
    # Only training and the command line use these (progress bars, curves.png, the preview PNG,
    # TensorBoard logs); installed all the same because training from Slicer is a feature.
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
}
# Distributions Slicer ships and other extensions rely on; pip must never replace them.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk")


class DependencyError(RuntimeError):
    """Required Python packages are missing and could not (or may not) be installed.

    Not a ``VoilaError``: this module must import before ``voila`` is importable.
    """


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def ensure_voila_importable() -> bool:
    """Make ``import voila`` work from wherever the module runs; return whether it does.

    The installed extension has ``voila/`` beside ``VOILASegmenterLib/``, in the folder Slicer puts on
    ``sys.path`` for the module. A source checkout (its VOILASegmenter folder added under
    Application Settings > Modules) has it in ``<repo>/VOILATraining``. Whichever holds it is
    appended to ``sys.path`` when ``voila`` is not importable yet (appended: it shadows nothing).
    """
    if _importable("voila"):
        return True
    module_dir = Path(__file__).resolve().parents[1]
    for parent in (module_dir, module_dir.parent / "VOILATraining"):
        if (parent / "voila" / "__init__.py").is_file() and str(parent) not in sys.path:
            sys.path.append(str(parent))
    importlib.invalidate_caches()
    return _importable("voila")


def missing_packages() -> list[str]:
    """Pip requirements of the third-party packages that cannot be imported.

    Nothing is imported or downloaded. ``voila`` is not listed: it is part of the extension (see
    :func:`ensure_voila_importable`).
    """
    missing = [
        f"{name}{TORCH_REQUIREMENT}" if name == "torch" else name
        for name in TORCH_DISTRIBUTIONS
        if not _importable(name)
    ]
    return missing + [requirement for name, requirement in PYTHON_PACKAGES.items() if not _importable(name)]


def _is_torch(requirement: str) -> bool:
    return re.split(r"[^A-Za-z0-9_.-]", requirement, maxsplit=1)[0] in TORCH_DISTRIBUTIONS


def dependency_report() -> Optional[str]:
    """One paragraph naming what VOILA cannot import and what to do about it; None when all is there.

    For places that must fail with a clear message instead of an ImportError deep inside the
    model, e.g. the module's self-test (nothing is installed from there).
    """
    problems = []
    if not ensure_voila_importable():
        problems.append(
            "The 'voila' package that ships with the extension cannot be found; reinstall the VOILA "
            "extension from the Extensions Manager (for a source checkout, add its VOILASegmenter "
            "folder under Application Settings > Modules)."
        )
    missing = missing_packages()
    if missing:
        torch_hint = (
            " PyTorch comes from the 'PyTorch' extension: install that from the Extensions Manager "
            "first if it is not there."
            if any(_is_torch(requirement) for requirement in missing)
            else ""
        )
        problems.append(
            f"Slicer's Python lacks {', '.join(missing)}. Open the VOILA Segmenter module and press "
            "Segment once to install them (you are asked first), or call "
            "VOILASegmenterLib.environment.install_dependencies(lambda text: True) in the Python "
            f"console.{torch_hint}"
        )
    return " ".join(["VOILA cannot run:", *problems]) if problems else None


def installed_versions(distributions=PROTECTED_DISTRIBUTIONS) -> dict[str, Optional[str]]:
    versions = {}
    for distribution in distributions:
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    return versions


def pip_arguments(requirements: list[str], protected: dict[str, Optional[str]]) -> list[str]:
    """``pip install`` arguments that add ``requirements`` and hold protected distributions as they are."""
    pins = [f"{name}=={version}" for name, version in protected.items() if version]
    return [*requirements, *pins, "--upgrade-strategy", "only-if-needed"]


def confirmation_text(missing: list[str]) -> str:
    return (
        "VOILA needs these Python packages, which are not installed yet:\n\n  "
        + "\n  ".join(missing)
        + "\n\nThey will be downloaded and installed into Slicer's Python (PyTorch through the PyTorch "
        "extension). This can take several minutes and a few GB of disk space. Slicer's own numpy, "
        "SimpleITK and VTK are kept. Install now?"
    )


def install_dependencies(
    confirm_callback: Callable[[str], bool], log: Optional[Callable[[str], None]] = None
) -> bool:
    """Install what :func:`missing_packages` lists after ``confirm_callback(text)`` returned True.

    Returns True when everything is importable afterwards (immediately if nothing was missing),
    False when the user declined. Raises :class:`DependencyError` when installation failed or
    would have replaced one of Slicer's protected packages.
    """
    log = log or logging.info
    missing = missing_packages()
    if not missing:
        return True
    if not confirm_callback(confirmation_text(missing)):
        log("VOILA: installation of Python packages declined")
        return False
    import slicer

    if any(_is_torch(requirement) for requirement in missing):
        _install_torch(log)
    before = installed_versions()
    requirements = [requirement for requirement in missing if not _is_torch(requirement)]
    if requirements:
        held = {**before, **installed_versions(TORCH_DISTRIBUTIONS)}
        log(f"VOILA: pip install {' '.join(requirements)}")
        try:
            slicer.util.pip_install(pip_arguments(requirements, held))
        except Exception as error:
            raise DependencyError(
                f"installing {', '.join(requirements)} failed ({error}); see the Python console, "
                "check the network connection and try again"
            ) from None
    after = installed_versions()
    changed = [name for name in before if before[name] and after[name] != before[name]]
    if changed:
        raise DependencyError(
            "installation changed Slicer's own "
            + ", ".join(f"{n} {before[n]} -> {after[n]}" for n in changed)
            + "; reinstall Slicer (or remove the changed package from Slicer's Python) before continuing"
        )
    importlib.invalidate_caches()
    still_missing = missing_packages()
    if still_missing:
        raise DependencyError(
            f"{', '.join(still_missing)} still cannot be imported after installation; restart Slicer and try again"
        )
    return True


def _install_torch(log: Callable[[str], None]) -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "PyTorch is missing and the PyTorch extension is not installed; install 'PyTorch' from the "
            "Extensions Manager, restart Slicer and try again"
        ) from None
    log("VOILA: installing PyTorch through the PyTorch extension")
    # The user already agreed to the full list, which names PyTorch; one question is enough.
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT
    )
    if torch is None:
        raise DependencyError("PyTorch was not installed; install it from the PyTorch module and try again")
