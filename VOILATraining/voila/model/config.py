"""Model configuration: presets are data (``voila/presets/*.yaml``), not code forks."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from voila.errors import ConfigError
from voila.model.interaction import FUSION_HEADS

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


@dataclass
class VoxelEncoderConfig:
    in_channels: int = 1
    stem_width: int = 16
    stage_blocks: list[int] = field(default_factory=lambda: [3, 4, 23, 3])
    stage_strides: list[int] = field(default_factory=lambda: [1, 2, 2, 1])
    stage_dilations: list[int] = field(default_factory=lambda: [1, 1, 1, 2])
    norm: str = "instance"


@dataclass
class CASConfig:
    """``target``: ``error`` (1 - the probability of the true class: a map of how likely a voxel is
    wrong, comparable across patches and volumes) or ``rank`` (the paper's: ranks within a patch,
    1 = least confident). Both order a patch's voxels alike, so CAS samples the same voxels.
    ``prior_weight``: weight of the reconstruction from the prior mean ``z = 0``, the path the
    heatmap is drawn with at inference (without it, with the paper's tiny KL weight, the decoder
    learns to rely on ``z`` and draws from ``z = 0`` something it was never trained to draw)."""

    channels: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    latent_dim: int = 32
    kld_weight: float = 1e-8
    target_sigma: float = 1.0
    target: str = "error"
    prior_weight: float = 1.0


@dataclass
class SamplingConfig:
    mode: str = "cas"  # cas | random | none
    ratio: float = 0.1
    oversampling: int = 2


@dataclass
class TextEncoderConfig:
    model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"


@dataclass
class ModelConfig:
    name: str = "paper"
    description: str = ""
    voxel_encoder: VoxelEncoderConfig = field(default_factory=VoxelEncoderConfig)
    neck_channels: int = 32
    token_dim: int = 32
    head: str = "language"  # language | linear (the paper's "w/o V-L interaction" ablation)
    # a learned vector per class added to its projected text embedding (the pulmonary artery/vein
    # paper's "self-adaptive" text adapters on a frozen CLIP)
    text_adapters: bool = False
    # class embeddings attend to the image's voxel tokens before classifying (the same paper's
    # cross-attention fusion of text and image features; ``voila.model.interaction``)
    fusion: bool = False
    cas: CASConfig = field(default_factory=CASConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    patch_size: list[int] = field(default_factory=lambda: [128, 128, 128])
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = copy.deepcopy(data)
        sections = {
            "voxel_encoder": VoxelEncoderConfig,
            "cas": CASConfig,
            "sampling": SamplingConfig,
            "text_encoder": TextEncoderConfig,
        }
        try:
            for key, section in sections.items():
                if key in data:
                    data[key] = section(**data[key])
            config = cls(**data)
        except TypeError as error:
            raise ConfigError(f"invalid model configuration: {error}") from None
        config.validate()
        return config

    def validate(self) -> None:
        encoder = self.voxel_encoder
        if not (len(encoder.stage_blocks) == len(encoder.stage_strides) == len(encoder.stage_dilations)):
            raise ConfigError(
                "voxel_encoder: stage_blocks, stage_strides and stage_dilations need equal lengths"
            )
        if self.head not in ("language", "linear"):
            raise ConfigError(f"head must be 'language' or 'linear', not {self.head!r}")
        if self.fusion and self.head != "language":
            raise ConfigError("the cross-attention fusion needs the language head (head: language)")
        if self.fusion and self.token_dim % FUSION_HEADS:
            raise ConfigError(f"the cross-attention fusion needs token_dim divisible by {FUSION_HEADS}")
        if self.cas.target not in ("error", "rank"):
            raise ConfigError(f"cas.target must be 'error' or 'rank', not {self.cas.target!r}")
        if self.cas.prior_weight < 0:
            raise ConfigError("cas.prior_weight must be >= 0")
        if self.sampling.mode not in ("cas", "random", "none"):
            raise ConfigError(f"sampling.mode must be cas, random or none, not {self.sampling.mode!r}")
        if not 0 < self.sampling.ratio <= 1:
            raise ConfigError(f"sampling.ratio must be in (0, 1], not {self.sampling.ratio}")
        if self.sampling.oversampling < 0:
            raise ConfigError("sampling.oversampling must be >= 0")
        if self.token_dim < 1 or self.neck_channels < 1:
            raise ConfigError("token_dim and neck_channels must be positive")

    @property
    def output_stride(self) -> int:
        """How much coarser than the input the deepest stage is (stem stride 2 times the stages')."""
        stride = 2
        for s in self.voxel_encoder.stage_strides:
            stride *= s
        return stride


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> ModelConfig:
    """The named preset (``paper``, ``small``, ``tiny``) or a path to a preset YAML file."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(available_presets())}")
    with open(path, encoding="utf-8") as stream:
        return ModelConfig.from_dict(yaml.safe_load(stream))
