"""First-run Python dependencies: find what is missing and install it only after the user agreed.

PyTorch comes through the PyTorch extension (``PyTorchUtils``), which picks the build that matches
the GPU driver; the rest through ``slicer.util.pip_install``. Slicer's own numpy, SimpleITK and vtk
are never replaced: their installed versions are pinned on the pip command line (so pip fails rather
than swapping them) and checked again afterwards. Nothing is downloaded when everything is present,
so the module works offline once set up.

    missing = missing_packages()          # e.g. ["monai", "open_clip_torch"]
    install_dependencies(lambda text: slicer.util.confirmOkCancelDisplay(text))
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Callable, Optional

TORCH_REQUIREMENT = ">=2.1"
# import name -> pip requirement; order is install order.
PYTHON_PACKAGES = {
    "monai": "monai>=1.3",
    "open_clip": "open_clip_torch>=2.23",
    "safetensors": "safetensors>=0.4",
    "nibabel": "nibabel>=5",
    "yaml": "pyyaml",
    "scipy": "scipy",
    "psutil": "psutil",
}
VOILA_DISTRIBUTION = "voila-seg"
# Distributions Slicer ships and other extensions rely on; pip must never replace them.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk")


class DependencyError(RuntimeError):
    """Required Python packages are missing and could not (or may not) be installed.

    Not a ``VoilaError``: this module must import before ``voila`` itself is installed.
    """


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_packages() -> list[str]:
    """Pip requirements of the packages that cannot be imported (nothing is imported or downloaded)."""
    missing = [] if _importable("torch") else [f"torch{TORCH_REQUIREMENT}"]
    missing += [requirement for name, requirement in PYTHON_PACKAGES.items() if not _importable(name)]
    if not _importable("voila.infer"):
        missing.append(VOILA_DISTRIBUTION)
    return missing


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


def voila_requirement() -> str:
    """A source checkout next to the module installs from there; otherwise the released package."""
    checkout = Path(__file__).resolve().parents[2] / "VOILATraining"
    if (checkout / "pyproject.toml").is_file():
        return str(checkout)
    return VOILA_DISTRIBUTION


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

    if any(requirement.startswith("torch") for requirement in missing):
        _install_torch(log)
    before = installed_versions()
    requirements = [r for r in missing if not r.startswith("torch")]
    requirements = [voila_requirement() if r == VOILA_DISTRIBUTION else r for r in requirements]
    if requirements:
        log(f"VOILA: pip install {' '.join(requirements)}")
        try:
            slicer.util.pip_install(pip_arguments(requirements, before))
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
