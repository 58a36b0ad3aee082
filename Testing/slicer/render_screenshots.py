"""Render the extension's screenshots with slicer-core's slice logic: no OpenGL, no Slicer app.

    python Testing/slicer/render_screenshots.py [--prompts "liver, spleen, left kidney"] [--out DIR]

Writes ``segments.png`` (CT + segments as a label layer) and ``heatmap.png`` (CT + review map,
the module's default heatmap, as the foreground layer) to ``Resources/Screenshots/``. The slice logic's reslice and blend
pipeline (``vtkMRMLSliceLogic.GetImageDataConnection()``) is pure VTK image processing, so it runs
headless; segments are drawn through a label-map export because the segmentation displayable
manager needs a render window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slicer
import vtk
from mrml_scene import REPO, SAMPLE_CT, load_volume, new_scene
from vtk.util import numpy_support


def render(slice_logic) -> np.ndarray:
    """The slice view's blended RGBA image as ``(rows, columns, 4)`` uint8, top row first."""
    producer = slice_logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    columns, rows, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return pixels.reshape(rows, columns, -1)[::-1].copy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="liver, spleen, left kidney, right kidney, aorta, stomach")
    parser.add_argument("--ct", type=Path, default=SAMPLE_CT)
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)

    from VOILASegmenterLib.logic import VOILASegmenterLogic

    scene = new_scene()
    ct = load_volume(scene, args.ct)
    outcome = VOILASegmenterLogic().process(ct, args.prompts, None, showHeatmap=False)
    for message in outcome.messages:
        print(message)

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "segments")
    segment_ids = [record.segmentId for record in outcome.segments if record.found]
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        outcome.segmentation, ids, labelmap, ct
    )

    slice_logic = scene._voila_logics[2]
    slice_node = slice_logic.GetSliceNode()
    slice_node.SetOrientationToAxial()
    slice_node.SetDimensions(args.size, args.size, 1)
    composite = slice_logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(ct.GetID())
    ct.GetDisplayNode().AutoWindowLevelOff()
    ct.GetDisplayNode().SetWindowLevel(400, 40)
    slice_logic.FitSliceToAll()
    # Show the axial slice through the centre of the first found structure.
    first = outcome.segments[[r.found for r in outcome.segments].index(True)] if segment_ids else None
    if first is not None:
        centre = outcome.segmentation.GetSegmentCenterRAS(first.segmentId)
        slice_logic.SetSliceOffset(centre[2])

    args.out.mkdir(parents=True, exist_ok=True)
    composite.SetLabelVolumeID(labelmap.GetID())
    composite.SetLabelOpacity(0.6)
    composite.SetForegroundVolumeID(None)
    Image.fromarray(render(slice_logic)[..., :3]).save(args.out / "segments.png")

    composite.SetLabelVolumeID(None)
    composite.SetForegroundVolumeID(outcome.heatmap.GetID())
    composite.SetForegroundOpacity(0.55)
    Image.fromarray(render(slice_logic)[..., :3]).save(args.out / "heatmap.png")
    print(f"wrote {args.out / 'segments.png'} and {args.out / 'heatmap.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
