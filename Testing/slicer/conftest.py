"""MRML without the Slicer application: ``slicer-core`` scenes set up the way Slicer's startup does.

The module's GUI-free library (``VOILASegmenter/VOILASegmenterLib``) is imported exactly as Slicer
imports it: with the module folder on ``sys.path`` (done by ``mrml_scene``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) provides MRML")

from mrml_scene import new_scene


@pytest.fixture
def scene():
    scene = new_scene()
    yield scene
    scene.Clear(1)
