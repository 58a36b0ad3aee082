"""VOILA (``paper``, ``small``) versus nnU-Net's 3d_fullres network as TotalSegmentator configures
it: seconds per CT, trainable parameters, MACs per window, peak RSS (target: VOILA paper ≤ 0.5×
nnU-Net's seconds per CT).

nnU-Net: ``dynamic_network_architectures`` ``PlainConvUNet`` with 6 stages, features
[32, 64, 128, 256, 320, 320], 3³ kernels, strides [1, 2, 2, 2, 2, 2], 2 convolutions per stage
in encoder and decoder, InstanceNorm3d(affine), LeakyReLU(0.01), conv bias, no deep supervision
at inference, 118 output channels (background + 117 TotalSegmentator v2 classes). All networks
have untrained weights (cost does not depend on them).

Every model sees the same input: the bundled CT preprocessed once by voila's shared
preprocessing to the ``--spacing`` grid (1.5 mm: TotalSegmentator's full-resolution model), and
the same blending code, :func:`voila.infer.sliding_window.blend_windows` (MONAI's
``sliding_window_inference``: 128³ windows, ``--overlap``, Gaussian weights, a CPU buffer in
float16 above 1 GiB). VOILA
runs its real predictor (:func:`voila.infer.sliding_window.predict_grid`: 33 blended channels,
then 118 class logits in chunks), for segmentation alone (``paper``, ``small``: the task nnU-Net
does, and the ratio the target is about) and with the CAS heatmap (``paper+heatmap``); nnU-Net's predictor returns and blends 118 logits per voxel,
then the argmax is taken in chunks. Each model runs in its own process (peak RSS); MACs are
FLOPs / 2 from ``torch.utils.flop_counter.FlopCounterMode`` on one window.

    python Testing/benchmarks/bench_vs_nnunet.py [--overlap 0.5] [--spacing 1.5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np
import torch

PATCH = (128, 128, 128)
CLASSES = 118
TARGET = 0.5
# "paper" is segmentation alone (what nnU-Net does); "paper+heatmap" adds the CAS decoder's map.
WITH_HEATMAP = "+heatmap"
NNUNET_CONFIG = {
    "network": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "input_channels": 1,
    "n_stages": 6,
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_conv_per_stage": [2] * 6,
    "n_conv_per_stage_decoder": [2] * 5,
    "conv_bias": True,
    "norm_op": "InstanceNorm3d(eps=1e-5, affine=True)",
    "nonlin": "LeakyReLU(inplace=True)",
    "deep_supervision": False,
    "num_classes": CLASSES,
    "patch_size": list(PATCH),
}


def nnunet_network() -> torch.nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    c = NNUNET_CONFIG
    return PlainConvUNet(
        input_channels=c["input_channels"],
        n_stages=c["n_stages"],
        features_per_stage=c["features_per_stage"],
        conv_op=torch.nn.Conv3d,
        kernel_sizes=c["kernel_sizes"],
        strides=c["strides"],
        n_conv_per_stage=c["n_conv_per_stage"],
        num_classes=c["num_classes"],
        n_conv_per_stage_decoder=c["n_conv_per_stage_decoder"],
        conv_bias=c["conv_bias"],
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=c["deep_supervision"],
    )


def macs_per_window(forward, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    window = torch.randn(1, 1, *PATCH, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(window)
    return counter.get_total_flops() // 2


def predict_nnunet(network, image: torch.Tensor, overlap: float, device: torch.device, amp) -> torch.Tensor:
    """nnU-Net-style prediction: blend 118 logits per voxel, then argmax in chunks."""
    from voila.infer.sliding_window import CHUNK_VOXELS, blend_windows, blending_dtype

    spatial = tuple(image.shape[1:])
    voxels = int(np.prod(spatial))
    buffer_dtype = blending_dtype(CLASSES, spatial)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        window = window.to(device=device, dtype=torch.float32)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return network(window).to(buffer_dtype)

    with torch.no_grad():
        logits = blend_windows(image, predictor, PATCH, overlap, buffer_dtype, device).reshape(CLASSES, -1)
        labels = torch.empty(voxels, dtype=torch.int64)
        for start in range(0, voxels, CHUNK_VOXELS):
            labels[start : start + CHUNK_VOXELS] = logits[:, start : start + CHUNK_VOXELS].argmax(dim=0)
    return labels.view(spatial)


def child(name: str, grid_path: str, overlap: float, device_name: str) -> None:
    from voila.infer.sliding_window import default_amp_dtype, predict_grid
    from voila.model.config import load_preset
    from voila.model.voila import VoilaModel

    device = torch.device(device_name)
    amp = default_amp_dtype(device)
    torch.manual_seed(0)
    image = torch.from_numpy(np.load(grid_path))
    if name == "nnunet":
        network = nnunet_network().to(device).eval()
        parameters = sum(p.numel() for p in network.parameters() if p.requires_grad)
        macs = macs_per_window(network, device)

        def run():
            return predict_nnunet(network, image, overlap, device, amp)
    else:
        preset, heatmap = name.removesuffix(WITH_HEATMAP), name.endswith(WITH_HEATMAP)
        config = load_preset(preset)
        config.patch_size = list(PATCH)
        network = VoilaModel(config, text_dim=512).to(device).eval()
        parameters = network.trainable_parameters()
        macs = macs_per_window(network if heatmap else network.voxel_tokens, device)
        with torch.no_grad():
            embeddings = network.class_embeddings(torch.randn(CLASSES - 1, 512, device=device))

        def run():
            return predict_grid(
                network,
                embeddings,
                image,
                PATCH,
                overlap=overlap,
                device=device,
                amp_dtype=amp,
                heatmap=heatmap,
            ).labels

    windows = {"count": 0}
    # one call per window: the whole network for nnU-Net, the voxel encoder for VOILA (with or
    # without the heatmap, predict_grid runs it once per window)
    counted = network if name == "nnunet" else network.voxel_encoder
    counted.register_forward_hook(lambda *_: windows.__setitem__("count", windows["count"] + 1))
    if device.type == "cuda":
        run()  # CUDA warm-up (kernel selection) over the whole CT
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    windows["count"] = 0
    started = time.perf_counter()
    labels = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    benchlib.child_report(
        {
            "model": name,
            "device": device_name,
            "amp": str(amp) if amp is not None else "none (fp32)",
            "seconds": seconds,
            "windows": windows["count"],
            "seconds_per_window": seconds / max(windows["count"], 1),
            "trainable_parameters": parameters,
            "macs_per_window": macs,
            "grid": list(labels.shape),
            "gpu_max_memory_allocated_bytes": torch.cuda.max_memory_allocated()
            if device.type == "cuda"
            else None,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap (nnU-Net's step 0.5)")
    parser.add_argument("--spacing", type=float, default=1.5, help="model grid in mm")
    parser.add_argument("--models", default="nnunet,paper,paper+heatmap,small")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "GRID", "OVERLAP", "DEVICE"))
    args = parser.parse_args()
    if args.child:
        name, grid, overlap, device = args.child
        child(name, grid, float(overlap), device)
        return

    from voila.data.io import read_image
    from voila.data.preprocess import PreprocessingConfig, preprocess_volume

    info = benchlib.machine()
    benchlib.print_machine(info)
    image, affine = read_image(benchlib.SAMPLE_CT)
    grid = preprocess_volume(image, affine, PreprocessingConfig(spacing=(args.spacing,) * 3)).image
    print(f"{benchlib.SAMPLE_CT.name} on the {args.spacing} mm grid: {tuple(grid.shape[1:])}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    models = args.models.split(",")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        grid_path = Path(folder) / "grid.npy"
        np.save(grid_path, grid.numpy())
        for device in devices:
            for name in models:
                print(f"{name} on {device} ...", flush=True)
                measured = benchlib.run_child(
                    [__file__, "--child", name, str(grid_path), str(args.overlap), device]
                )
                print(f"  {measured['seconds']:.1f} s, {measured['windows']} windows", flush=True)
                results.append(measured)

    rows = []
    for device in devices:
        reference = next((r for r in results if r["model"] == "nnunet" and r["device"] == device), None)
        for r in (r for r in results if r["device"] == device):
            ratio = r["seconds"] / reference["seconds"] if reference else None
            r["seconds_ratio_to_nnunet"] = ratio
            gpu = r["gpu_max_memory_allocated_bytes"]
            rows.append(
                [
                    "nnU-Net 3d_fullres" if r["model"] == "nnunet" else f"VOILA {r['model']}",
                    device,
                    f"{r['seconds']:.1f}",
                    f"{r['seconds_per_window']:.2f}",
                    f"{ratio:.2f}x" if ratio is not None else "-",
                    f"{r['trainable_parameters'] / 1e6:.2f} M",
                    f"{r['macs_per_window'] / 1e9:.1f} G",
                    f"{benchlib.gib(r['peak_rss_bytes']):.2f}",
                    f"{benchlib.gib(gpu):.2f}" if gpu is not None else "-",
                ]
            )
    if not torch.cuda.is_available():
        rows.append(["all", "cuda", benchlib.NO_GPU, "", "", "", "", "", ""])
    benchlib.print_table(
        [
            "model",
            "device",
            "s / CT",
            "s / window",
            "vs nnU-Net",
            "trainable",
            "MACs / window",
            "peak RSS (GiB)",
            "GPU max alloc (GiB)",
        ],
        rows,
        title=(
            f"{benchlib.SAMPLE_CT.name}, {args.spacing} mm grid {tuple(grid.shape[1:])}, 128^3 windows, "
            f"overlap {args.overlap}, Gaussian blending, {CLASSES} classes"
        ),
    )
    paper = next((r for r in results if r["model"] == "paper" and r["device"] == "cpu"), None)
    verdict = None
    if paper and paper.get("seconds_ratio_to_nnunet") is not None:
        verdict = paper["seconds_ratio_to_nnunet"] <= TARGET
        print(
            f"\nVOILA paper / nnU-Net seconds per CT on the CPU: {paper['seconds_ratio_to_nnunet']:.2f}x "
            f"(target <= {TARGET}x): {'holds' if verdict else 'does NOT hold'}"
        )
    benchlib.write_results(
        "vs_nnunet",
        {
            "machine": info,
            "nnunet_configuration": NNUNET_CONFIG,
            "grid_spacing_mm": args.spacing,
            "grid_shape": list(grid.shape[1:]),
            "overlap": args.overlap,
            "target": f"VOILA paper <= {TARGET}x nnU-Net seconds per CT",
            "target_holds_cpu": verdict,
            "results": results,
            "gpu": None if torch.cuda.is_available() else benchlib.NO_GPU,
        },
    )


if __name__ == "__main__":
    main()
