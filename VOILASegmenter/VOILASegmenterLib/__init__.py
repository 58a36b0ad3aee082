"""GUI-free parts of the VOILASegmenter module: MRML <-> numpy, the logic, models, dependencies.

Nothing here imports Qt, so the logic runs in Slicer's Python console, in a batch script, and in
tests that use ``slicer-core``'s MRML without the application.
"""

from __future__ import annotations
