"""The VOILA trainer: CPU, one GPU, or several GPUs/nodes under ``torchrun`` (DistributedDataParallel).

One optimiser step = ``accumulate`` micro-batches of ``batch_size`` random patches per process;
the loss is ``CE + F1 + MSE + λ·KLD`` over CAS-selected voxels (:meth:`VoilaModel.losses`).
Adam with an optional warm-up + cosine schedule; AMP (bf16, or fp16 with a GradScaler) on CUDA.

The trainer is a sequence of hooks, each a method a subclass may override (nnU-Net's trainer
variants, one hook at a time):

- :meth:`Trainer.build_model_config` — the architecture: the preset and the settings that change it;
- :meth:`Trainer.build_model` — the network, class sentences and card, through the one factory
  (:func:`voila.model.factory.create_model`), from scratch or from an existing model file;
- :meth:`Trainer.parameter_groups` / :meth:`Trainer.build_optimizer` — what learns, and how fast;
- :meth:`Trainer.train_step` — one optimiser step;
- :meth:`Trainer.validate` and :meth:`Trainer.on_validation` — held-out Dice and what to do with it.

The run folder (:class:`voila.training.run_folder.RunFolder`) holds checkpoints, metrics,
pictures, the log, the resolved settings and the exported model. Resuming restores weights,
optimiser, scheduler, scaler, every RNG and the position inside the epoch; an epoch's items and
their augmentation are pure functions of ``(seed, epoch, item)``, so a run killed with SIGKILL and
resumed ends with the same weights as one never interrupted.

Example::

    trainer = Trainer(load_train_config("train.yaml"), progress=print, stop=threading.Event())
    model_path = trainer.run()
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from voila.data.preprocess import PreprocessingConfig
from voila.device import autocast_dtype, resolve_device
from voila.errors import ConfigError, ModelFileError, TrainingError
from voila.infer.review import CalibrationSample, IntensityProfile
from voila.model.config import ModelConfig, load_preset
from voila.model.factory import BuiltModel, create_model
from voila.model.model_file import LoadedModel
from voila.model.text_encoder import TextEmbeddingCache, TextEncoder
from voila.model.voila import VoilaLosses, VoilaModel
from voila.training.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from voila.training.config import TrainConfig
from voila.training.data import PatchDataset, TrainingData, epoch_keys, patch_transforms
from voila.training.distributed import Distributed
from voila.training.export import RunTotals, export_model, review_entry, training_record, training_statistics
from voila.training.report import MetricsTable, TensorBoardLog, plot_curves, plot_validation
from voila.training.run_folder import RunFolder
from voila.training.timebox import plan_patch
from voila.training.validation import ValidationResult, validate_cases
from voila.vocabulary import DEFAULT_TEMPLATE, Vocabulary, free_text_color

LOG = logging.getLogger("voila.train")
LOSS_KEYS = ("loss", "ce", "f1", "cas_mse", "cas_kld", "cas_prior")


@dataclass
class TrainingProgress:
    """What the progress callback receives (also readable as ``progress["loss"]``).

    ``epoch`` is 1-based; ``step``/``total`` count optimiser steps of the whole run; ``eta`` is
    seconds to the end (training steps only), or None before the first step; ``train_seconds`` is
    the time this session spent in optimiser steps (validation and start-up excluded).
    """

    epoch: int
    epochs: int
    step: int
    total: int
    loss: float | None
    eta: float | None
    phase: str  # train | validate | stopped | done
    val_dice: float | None = None
    message: str = ""
    train_seconds: float = 0.0

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LossComputer(nn.Module):
    """Puts :meth:`VoilaModel.losses` behind ``forward`` so DistributedDataParallel syncs it."""

    def __init__(self, model: VoilaModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, ct: torch.Tensor, labels: torch.Tensor, features: torch.Tensor, annotated: torch.Tensor
    ) -> VoilaLosses:
        return self.model.losses(ct, labels, features, annotated)


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """One training run. ``progress`` gets a :class:`TrainingProgress` per optimiser step and
    phase change; setting ``stop`` ends the run cleanly (checkpoint + exported model)."""

    plans_patch = True  # a time box on the CPU may choose the patch (fit_patch_to_time_box)

    def __init__(
        self,
        config: TrainConfig,
        progress: Callable[[TrainingProgress], None] | None = None,
        stop: threading.Event | None = None,
        progress_bar: bool = True,
    ) -> None:
        self.config = config
        self.progress = progress
        self.stop_event = stop or threading.Event()
        self.progress_bar = progress_bar
        self.dist = Distributed()
        self.folder = RunFolder(config.out_dir, config.export_path)
        self.tensorboard: TensorBoardLog | None = None
        self.session_steps, self.session_train_seconds = 0, 0.0
        self.best_scores: dict[str, float] = {}
        self.commands = [config.command]
        self.last_validation_step = -1

    # -- hooks -----------------------------------------------------------------------------
    def build_model_config(self) -> ModelConfig:
        """The preset with the settings that change it (patch, sampling, text encoder weights)."""
        config = self.config
        values = self.with_run_settings(load_preset(config.preset).to_dict())
        values["text_encoder"]["pretrained"] = config.text_pretrained_tag(
            values["text_encoder"]["pretrained"]
        )
        values["text_adapters"] = bool(config.text_adapters)
        values["fusion"] = bool(config.fusion)
        return ModelConfig.from_dict(values)

    def with_run_settings(self, values: dict[str, Any]) -> dict[str, Any]:
        """A model configuration's ``values`` (``ModelConfig.to_dict()``) with the run's settings
        that may change it: the patch and the sampling."""
        config = self.config
        if config.patch_size:
            values["patch_size"] = list(config.patch_size)
        if config.sampling:
            values["sampling"]["mode"] = config.sampling
        if config.sampling_ratio is not None:
            values["sampling"]["ratio"] = config.sampling_ratio
        if config.oversampling is not None:
            values["sampling"]["oversampling"] = config.oversampling
        return values

    def build_preprocessing(self) -> PreprocessingConfig:
        """The one preprocessing of the model this run makes (its grid spacing)."""
        return PreprocessingConfig(spacing=tuple(self.config.spacing))

    def load_vocabulary(self) -> Vocabulary:
        """The vocabulary labels are named by (the installed one)."""
        return Vocabulary.load()

    def prepare_data(self, **options: Any) -> TrainingData:
        """Every case read and preprocessed once, the class list, what was skipped (every rank).
        ``options``: more of :meth:`TrainingData.prepare`'s (fine-tuning: the base's classes)."""
        config = self.config
        return TrainingData.prepare(
            config.data,
            self.preprocessing,
            self.vocabulary,
            val_fraction=config.val_fraction,
            seed=config.seed,
            cache=config.cache,
            cache_dir=self.folder.cache,
            need_validation_cases=self.dist.main,
            structures=config.structures or None,
            annotated_region=config.annotated_region,
            **options,
        )

    def validate_model(self, model, features=None, class_names=None, patch_size=None, **options):
        """:func:`validate_cases` of ``model`` on this run's validation cases, with the run's
        overlap, device and AMP; ``features``, ``class_names`` and ``patch_size`` default to the
        run's; ``options``: the other settings of :func:`validate_cases`."""
        return validate_cases(
            model,
            self.features if features is None else features,
            self.data.cases,
            self.data.val_indices,
            class_names or self.data.class_names,
            patch_size or self.model_config.patch_size,
            overlap=self.config.val_overlap,
            device=self.device,
            amp_dtype=self.amp_dtype,
            **options,
        )

    def fit_patch_to_time_box(self, resume_state: dict[str, Any] | None) -> None:
        """Without ``--patch-size``: a resumed run keeps its checkpoint's patch; a new run with a
        time box on the CPU takes the largest patch with which an epoch fits in the box
        (:func:`voila.training.timebox.plan_patch`, measured on this machine)."""
        config, model_config = self.config, self.model_config
        if config.patch_size:
            return
        if resume_state is not None:
            model_config.patch_size = list(resume_state["model_config"]["patch_size"])
            return
        if not self.plans_patch or config.max_minutes is None or self.device.type != "cpu":
            return
        seconds = config.max_minutes * 60 - (time.monotonic() - self.session_start)
        steps = min(self.steps_per_epoch, self.steps_per_epoch * config.epochs)
        plan = self.dist.agree(
            lambda: plan_patch(
                model_config,
                len(self.data.class_names),
                self.features.shape[1],
                config.batch_size * config.accumulate,
                seconds,
                steps,
            )
        )
        preset = "×".join(str(n) for n in model_config.patch_size)
        chosen = "×".join(str(n) for n in plan.patch_size)
        if plan.patch_size == list(model_config.patch_size):
            LOG.info(
                "time box: the patch %s fits (%.1f s per step on the CPU)", preset, plan.seconds_per_step
            )
            return
        LOG.info(
            "time box: patch %s instead of the preset's %s, so that an epoch (%d steps) fits in %.1f "
            "minutes on the CPU (measured %s); about %d steps fit; --patch-size chooses the patch",
            chosen,
            preset,
            steps,
            seconds / 60,
            ", ".join(f"{edge}³ {t:.1f} s/step" for edge, t in sorted(plan.measured.items())),
            plan.steps_in_box,
        )
        model_config.patch_size = list(plan.patch_size)

    def base_model(self) -> LoadedModel | None:
        """An existing model to start from (fine-tuning); None trains from scratch."""
        return None

    def labelled_by_hand(self, index: int) -> torch.Tensor:
        """The classes ``(N,)`` bool whose labels in training case ``index`` come from the data,
        not from a model: where structures lie and their intensities are measured on these only."""
        return self.data.cases[index].annotated

    def build_model(self, features: torch.Tensor) -> BuiltModel:
        """The network for the data's classes, through the one factory; ``features`` ``(N - 1, F)``
        are the class sentences' CLIP features (encoded once, or restored from a checkpoint)."""
        return create_model(
            self.model_config,
            self.data.class_names[1:],
            self.vocabulary,
            self.preprocessing,
            template=DEFAULT_TEMPLATE,
            text_cache=TextEmbeddingCache(self.data.class_texts, features.detach().cpu().float()),
            base=self.base_model(),
        )

    def parameter_groups(self, model: VoilaModel) -> list[dict[str, Any]]:
        """Optimiser parameter groups: the voxel encoder's backbone at ``encoder_lr`` × ``lr``, the
        rest at ``lr``; with ``trainable: neck`` the backbone is frozen but its last stage."""
        config = self.config
        backbone = model.voxel_encoder.backbone
        if config.trainable == "neck":
            backbone.requires_grad_(False)
            backbone.stages[-1].requires_grad_(True)
        in_backbone = {id(p) for p in backbone.parameters()}
        groups = [
            {
                "params": [p for p in backbone.parameters() if p.requires_grad],
                "lr": config.lr * config.encoder_lr,
            },
            {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone]},
        ]
        return [group for group in groups if group["params"]]

    def build_optimizer(self, model: VoilaModel) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameter_groups(model), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def train_step(self, batches) -> dict[str, float]:
        """One optimiser step over ``accumulate`` micro-batches drawn from ``batches``; returns the
        step's mean losses (:data:`LOSS_KEYS`)."""
        config, dist = self.config, self.dist
        sums = {key: 0.0 for key in LOSS_KEYS}
        for micro in range(config.accumulate):
            batch = next(batches)
            # plain tensors: MONAI's MetaTensor dispatch on every op only costs time here
            image, label, annotated = (
                torch.as_tensor(batch[key]).as_subclass(torch.Tensor).to(self.device, non_blocking=True)
                for key in ("image", "label", "annotated")
            )
            last_micro = micro == config.accumulate - 1
            sync = self.train_module.no_sync() if dist.active and not last_micro else contextlib.nullcontext()
            with sync:
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    losses = self.train_module(image, label, self.features, annotated)
                (nonfinite,) = dist.any(not bool(torch.isfinite(losses.total.detach())))
                if nonfinite:
                    self._diverged()
                self.scaler.scale(losses.total / config.accumulate).backward()
            for key, value in losses.scalars().items():
                sums[key] += value / config.accumulate
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # a finite loss can still step the weights to NaN/Inf (a huge learning rate): stop here,
        # not at the next validation, which would call the broken weights a broken model file
        (nonfinite,) = dist.any(not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()))
        if nonfinite:
            self._diverged()
        return sums

    def validate(self) -> ValidationResult | None:
        """Held-out Dice of every validation case (rank 0; None on the other ranks)."""
        self.last_validation_step = self.global_step
        result, failed = None, False
        if self.dist.main:
            self._report("validate", loss=getattr(self, "running_losses", {}).get("loss"))
            try:
                result = self.validate_model(
                    self.model, windows=self.config.val_windows, seed=self.config.seed
                )
            except ModelFileError:  # NaN/Inf outputs: the weights diverged, the run cannot go on
                failed = True
            self.model.train()
        (failed,) = self.dist.any(failed)  # every rank waits here for rank 0's validation
        if failed:
            self._diverged(" (in the model's outputs at validation)")
        if result is None:
            return None
        LOG.info(
            "validation after epoch %d: mean Dice %.4f over %d structures (%.1f s)",
            self.epoch + 1,
            result.mean,
            len(result.per_class),
            result.seconds,
        )
        if result.picture is not None:
            picture = result.picture
            plot_validation(
                self.folder.validation_picture,
                picture.ct,
                picture.reference,
                picture.prediction,
                picture.heatmap,
                self.class_colors(),
                f"{picture.case}, epoch {self.epoch + 1}, mean Dice {result.mean:.3f}",
            )
        self.on_validation(result)
        return result

    def on_validation(self, result: ValidationResult) -> None:
        """Called on rank 0 after each validation (benchmarks record curves or stop here)."""

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            return self._run()
        except BaseException:
            if self.dist.main:
                self.folder.discard_unused()
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            self.folder.release()
            self.dist.stop()

    def _run(self) -> Path:
        config, dist = self.config, self.dist
        self.session_start = time.monotonic()
        device = resolve_device(config.device, dist.local_rank if dist.active else None)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.start(device)
        self.device = device
        self.amp_dtype = autocast_dtype(device, config.amp)
        if config.amp in ("bf16", "fp16") and device.type != "cuda":
            LOG.warning("amp %s needs a CUDA device; training in float32 on %s", config.amp, device)
        if config.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

        self.model_config = self.build_model_config()
        self.preprocessing = self.build_preprocessing()
        snapshot = dict(config.sections())
        snapshot["run"] = dict(snapshot["run"], resume=config.resume)
        dist.agree(lambda: self.folder.claim(config.resume, snapshot, config.data))
        if dist.main:
            self.folder.start_log()
        LOG.info("command: %s", config.command or "(python API)")
        LOG.info("device %s, %d process(es), amp %s", device, dist.world, self.amp_dtype)

        self.vocabulary = self.load_vocabulary()
        self.data = dist.agree(self.prepare_data, everywhere=True)
        data = self.data
        for case, reason in data.skipped:
            LOG.warning("skipped case %s: %s", case, reason)
        LOG.info(
            "%d classes; %d training and %d validation cases%s; %d skipped",
            len(data.class_names) - 1,
            len(data.train_indices),
            len(data.val_indices),
            " (validating on the training cases: no held-out case)"
            if data.validating_on_training_cases
            else "",
            len(data.skipped),
        )

        resume_state = load_checkpoint(self.folder.last_checkpoint) if config.resume else None
        if resume_state is not None:
            if list(resume_state["classes"]) != data.class_names:
                raise ConfigError(
                    "the training data's structures differ from the checkpoint's "
                    f"({len(data.class_names) - 1} vs {len(resume_state['classes']) - 1}); "
                    "resume with the same --data, or start a new run with another --out"
                )
            features = resume_state["text_features"]
        else:
            features = dist.agree(self.encode_class_texts)
        self.features = features.to(device)
        self.steps_per_epoch = config.steps_per_epoch or max(
            1, math.ceil(len(data.train_indices) / (config.batch_size * config.accumulate * dist.world))
        )
        self.fit_patch_to_time_box(resume_state)

        seed_everything(config.seed)
        self.built = self.build_model(features)
        self.model = self.built.model.to(device)
        seed_everything(derived_seed(config.seed, dist.rank, 1))

        self.total_steps = self.steps_per_epoch * config.epochs
        self.optimizer = self.build_optimizer(self.model)
        self.parameter_groups_lrs = [{"lr": group["lr"]} for group in self.optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_dice, self.best_epoch, self.elapsed_before = -1.0, -1, 0.0
        if resume_state is not None:
            self._restore(resume_state)
        if self.epoch >= config.epochs:
            LOG.info("the run already finished its %d epochs; exporting the model again", config.epochs)
            return dist.agree(self._export)

        self.metrics = MetricsTable(self.folder.metrics, data.class_names)
        if dist.main:
            self.metrics.load(before_epoch=self.epoch)
            self.tensorboard = TensorBoardLog(self.folder.tensorboard, purge_step=self.global_step or None)

        self.train_module: nn.Module = _LossComputer(self.model)
        if dist.active:
            self.train_module = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[device.index] if device.type == "cuda" else None
            )
        crop, augmentation = patch_transforms(
            self.preprocessing,
            self.model_config.patch_size,
            config.foreground_oversampling,
            config.augment,
            mirror=config.mirror,
        )
        self.dataset = PatchDataset(data, crop, augmentation)
        return self._loop()

    def _loop(self) -> Path:
        config, dist = self.config, self.dist
        self.session_steps, self.session_train_seconds = 0, 0.0
        bar = None
        if dist.main and self.progress_bar:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.global_step,
                unit="step",
                desc="training",
                dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
                file=sys.stderr,
            )
        stopped_reason = ""
        try:
            while self.epoch < config.epochs and not stopped_reason:
                stopped_reason = self._train_epoch(bar)
                if stopped_reason:
                    break
                finished_epoch = self.epoch
                last_epoch = finished_epoch + 1 == config.epochs
                result = (
                    self.validate() if (finished_epoch + 1) % config.val_every == 0 or last_epoch else None
                )
                self.epoch, self.step_in_epoch = finished_epoch + 1, 0
                self._end_of_epoch(finished_epoch, result)
                (asked,) = dist.any(self.stop_event.is_set())
                if asked and not last_epoch:
                    stopped_reason = "stop requested"
        finally:
            if bar is not None:
                bar.close()
        if stopped_reason:
            LOG.info("stopped: %s", stopped_reason)
            self._save_state(best=False)
            if stopped_reason.startswith("time") and self.last_validation_step != self.global_step:
                self._record_final_validation(self.validate())
        path = self.dist.agree(self._export)
        self._report(
            "stopped" if stopped_reason else "done",
            message=f"model written to {path}" + (f" ({stopped_reason})" if stopped_reason else ""),
        )
        return path

    def _train_epoch(self, bar) -> str:
        """Optimiser steps of the current epoch from ``step_in_epoch``; returns a stop reason or ''."""
        config, dist = self.config, self.dist
        items_per_step = config.batch_size * config.accumulate
        keys = epoch_keys(
            self.data.train_indices,
            self.epoch,
            config.seed,
            self.steps_per_epoch * items_per_step,
            dist.world,
            dist.rank,
        )[self.step_in_epoch * items_per_step :]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=config.batch_size,
            sampler=keys,
            num_workers=config.num_workers,
            generator=torch.Generator(),  # never draw from the global RNG: resume must not shift it
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )
        batches = iter(loader)
        self.model.train()
        sums = {key: 0.0 for key in LOSS_KEYS}
        count = 0
        for step in range(self.step_in_epoch, self.steps_per_epoch):
            started = time.monotonic()
            step_losses = self.train_step(batches)
            for key, value in step_losses.items():
                sums[key] += value
            count += 1
            self.global_step += 1
            self.step_in_epoch = step + 1
            self.session_steps += 1
            self.session_train_seconds += time.monotonic() - started
            running = {key: value / count for key, value in sums.items()}
            self.running_losses = running
            if self.tensorboard is not None:
                self.tensorboard.scalars(
                    {"loss": step_losses["loss"], "lr": self.optimizer.param_groups[0]["lr"]},
                    self.global_step,
                    "step",
                )
            if bar is not None:
                bar.update(1)
                postfix = {"epoch": f"{self.epoch + 1}/{config.epochs}", "loss": f"{running['loss']:.4f}"}
                if config.max_minutes is not None:  # the bar's ETA is for all epochs; say when the box ends
                    left = config.max_minutes * 60 - (time.monotonic() - self.session_start)
                    postfix["time box left"] = f"{max(left, 0) / 60:.1f} min"
                bar.set_postfix(postfix)
            self._report("train", loss=running["loss"])
            out_of_time = config.max_minutes is not None and (
                time.monotonic() - self.session_start > config.max_minutes * 60
            )
            asked, timed_out = dist.any(self.stop_event.is_set(), out_of_time)
            if asked or timed_out:
                self.epoch_losses = running
                return "stop requested" if asked else f"time limit of {config.max_minutes:g} minutes reached"
            if (
                config.checkpoint_every
                and self.global_step % config.checkpoint_every == 0
                and self.step_in_epoch < self.steps_per_epoch
            ):
                self._save_state(best=False)
        self.epoch_losses = {key: value / max(count, 1) for key, value in sums.items()}
        return ""

    # -- records, checkpoints ---------------------------------------------------------------
    def class_colors(self) -> np.ndarray:
        """``(N, 3)`` colours in [0, 1] per class index (vocabulary colours, else free-text ones)."""
        colors = []
        for name in self.data.class_names:
            rgb = self.vocabulary[name].color if name in self.vocabulary else free_text_color(name)
            colors.append(np.asarray(rgb, dtype=float) / 255.0)
        return np.vstack(colors)

    def _end_of_epoch(self, finished_epoch: int, result: ValidationResult | None) -> None:
        improved = False
        if self.dist.main:
            minutes = (self.elapsed_before + time.monotonic() - self.session_start) / 60
            row: dict[str, Any] = {
                "epoch": finished_epoch,
                "step": self.global_step,
                "minutes": round(minutes, 3),
                "lr": self.optimizer.param_groups[0]["lr"],
                **{k: round(v, 6) for k, v in self.epoch_losses.items()},
                "val_dice": None,
            }
            if result is not None and not math.isnan(result.mean):
                row["val_dice"] = round(result.mean, 6)
                row.update({f"dice_{k}": round(v, 6) for k, v in result.per_class.items()})
                improved = result.mean > self.best_dice
                if improved:
                    self.best_dice, self.best_epoch = result.mean, finished_epoch
                    self.best_scores = result.per_class
            self.metrics.append(row)
            if self.tensorboard is not None:
                self.tensorboard.scalars(self.epoch_losses, finished_epoch, "epoch")
                if row["val_dice"] is not None:
                    self.tensorboard.scalars({"mean_dice": row["val_dice"]}, finished_epoch, "validation")
                    self.tensorboard.scalars(result.per_class, finished_epoch, "validation_dice")
            plot_curves(self.folder.curves, self.metrics.rows)
        self._save_state(best=improved)
        self._report(
            "train", loss=self.epoch_losses.get("loss"), val_dice=None if result is None else result.mean
        )

    def _record_final_validation(self, result: ValidationResult | None) -> None:
        improved = False
        if result is not None and not math.isnan(result.mean):
            LOG.info("final validation: mean Dice %.4f", result.mean)
            if result.mean > self.best_dice:
                self.best_dice, self.best_epoch, self.best_scores = result.mean, self.epoch, result.per_class
                improved = True
        if self.dist.broadcast(improved):
            self._save_state(best=True, last=False)

    def _state(self) -> dict[str, Any]:
        rng = self.dist.gather(capture_rng())
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "best_scores": dict(self.best_scores),
            "rng": rng,
            "world_size": self.dist.world,
            "classes": list(self.data.class_names),
            "class_texts": list(self.data.class_texts),
            "text_features": self.features.detach().cpu(),
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "elapsed_seconds": self.elapsed_before + time.monotonic() - self.session_start,
            "commands": list(self.commands),
        }

    def _save_state(self, best: bool, last: bool = True) -> None:
        state = self._state()  # every rank: gathers the RNG states
        if not self.dist.main:
            return
        if last:
            save_checkpoint(self.folder.last_checkpoint, state)
        if best:
            save_checkpoint(self.folder.best_checkpoint, state)

    def _restore(self, state: dict[str, Any]) -> None:
        config = self.config
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise ConfigError(
                f"the checkpoint used {state.get('steps_per_epoch')} steps per epoch, this run "
                f"{self.steps_per_epoch}; resume with the same --batch-size, accumulate, steps_per_epoch and processes"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        fresh = [group["lr"] for group in self.parameter_groups_lrs]
        self.scheduler.base_lrs = list(fresh)
        for group, lr in zip(self.optimizer.param_groups, fresh):
            group["initial_lr"] = lr
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best_dice = float(state["best_dice"])
        self.best_epoch = int(state["best_epoch"])
        self.best_scores = {str(k): float(v) for k, v in state.get("best_scores", {}).items()}
        self.elapsed_before = float(state.get("elapsed_seconds", 0.0))
        previous = state.get("commands") or [state.get("config", {}).get("command", "")]
        self.commands = [str(c) for c in previous] + [config.command]
        rng = state["rng"]
        if int(state.get("world_size", 1)) == self.dist.world and len(rng) == self.dist.world:
            restore_rng(rng[self.dist.rank])
        else:
            LOG.warning(
                "the checkpoint was written by %s process(es), this run has %d: random streams are re-seeded",
                state.get("world_size"),
                self.dist.world,
            )
            seed_everything(derived_seed(config.seed, self.dist.rank, self.global_step))
        LOG.info(
            "resumed at epoch %d, step %d (global step %d)",
            self.epoch + 1,
            self.step_in_epoch,
            self.global_step,
        )

    def _diverged(self, where: str = "") -> None:
        last = self.folder.last_checkpoint
        kept = (
            f"the last good checkpoint {last} is kept"
            if last.is_file()
            else "no checkpoint had been written yet"
        )
        raise TrainingError(
            f"the training loss became NaN/Inf{where} at epoch {self.epoch + 1}, step {self.global_step + 1}; "
            f"training stopped and {kept}. Lower --lr (now {self.config.lr:g})"
            + (" or use amp bf16/none" if self.amp_dtype is not None else "")
            + " and continue with --resume"
        )

    def _export(self) -> Path:
        """The best checkpoint's weights (else the current ones) as the run's model file."""
        best = self.folder.best_checkpoint
        exported = self.build_model(self.features)
        source = "last"
        if best.is_file():
            exported.model.load_state_dict(load_checkpoint(best)["model"])
            source = f"best (epoch {self.best_epoch + 1}, mean Dice {self.best_dice:.4f})"
        else:
            exported.model.load_state_dict({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        totals = RunTotals(
            epochs_completed=self.epoch,
            optimizer_steps=self.global_step,
            steps_per_epoch=self.steps_per_epoch,
            minutes=(self.elapsed_before + time.monotonic() - self.session_start) / 60,
            processes=self.dist.world,
            device=str(self.device),
            amp=str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
            commands=self.commands,
            best_dice=self.best_dice,
            best_epoch=self.best_epoch,
            best_scores=self.best_scores,
        )
        calibration = None
        fit_here = self.config.calibration == "validation" and not self.data.validating_on_training_cases
        statistics = training_statistics(
            self.data, self.preprocessing, {i: self.labelled_by_hand(i) for i in self.data.train_indices}
        )
        profile = statistics.profile
        base = self.base_model()
        if base is not None and (base.card.get("review") or {}).get("intensity"):
            # fine-tuning: the base's classes the new cases do not label keep the base's profile
            profile.merged(IntensityProfile.from_card(base.card["review"]["intensity"], base.card["classes"]))
        if self.data.val_indices and (self.config.val_windows or fit_here):
            # once, whole cases: the figure the card gives, and the review map's calibration
            calibration = (
                CalibrationSample(seed=self.config.seed, profile=profile, preprocessing=self.preprocessing)
                if fit_here
                else None
            )
            final = self.validate_model(
                exported.model.to(self.device),
                picture=False,
                calibration=calibration,
                body_threshold=self.preprocessing.normalise(self.preprocessing.foreground_threshold),
            )
            exported.model.cpu()
            LOG.info(
                "validation of the exported model, whole cases: mean Dice %.4f (%.1f s)",
                final.mean,
                final.seconds,
            )
            totals.final_dice, totals.final_scores = final.mean, final.per_class
        review = review_entry(self.config, self.data, statistics, calibration)
        if base is not None:  # fine-tuning: what the new cases cannot tell comes from the base
            base_review = base.card.get("review") or {}
            for name, place in (base_review.get("places") or {}).items():
                review["places"].setdefault(name, place)
            if review["calibration"] is None and base_review.get("calibration"):
                review["calibration"] = base_review["calibration"]
                review["fitted_on"] = f"the base model's: {base_review.get('fitted_on', '')}"
                if base_review.get("joint"):
                    review["joint"] = base_review["joint"]
        record = self.training_record(totals, source)
        path = export_model(
            self.folder.model, exported, record, self.config, self.data, self.model_config, review
        )
        LOG.info("model exported to %s (%s weights)", path, source)
        return path

    def training_record(self, totals: RunTotals, source: str) -> dict[str, Any]:
        """The card's ``training`` entry (fine-tuning adds its base)."""
        return training_record(
            self.config, self.data, self.model_config, totals, source, spacing=self.preprocessing.spacing
        )

    # -- helpers ---------------------------------------------------------------------------
    def encode_class_texts(self) -> torch.Tensor:
        """CLIP features ``(N - 1, F)`` of the class sentences (rank 0; broadcast to the others)."""
        encoder_config = self.model_config.text_encoder
        LOG.info(
            "encoding %d class prompts with %s (%s)",
            len(self.data.class_texts),
            encoder_config.model_name,
            encoder_config.pretrained or "random weights",
        )
        encoder = TextEncoder(encoder_config.model_name, encoder_config.pretrained, device="cpu")
        return encoder.encode(self.data.class_texts)

    def _lr_factor(self, step: int) -> float:
        config = self.config
        warmup = config.warmup_epochs * self.steps_per_epoch
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            span = max(1.0, self.total_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def _report(
        self, phase: str, loss: float | None = None, val_dice: float | None = None, message: str = ""
    ) -> None:
        if self.progress is None or not self.dist.main:
            return
        eta = None
        if self.session_steps:
            eta = self.session_train_seconds / self.session_steps * (self.total_steps - self.global_step)
        self.progress(
            TrainingProgress(
                epoch=min(self.epoch + 1, self.config.epochs),
                epochs=self.config.epochs,
                step=self.global_step,
                total=self.total_steps,
                loss=loss,
                eta=eta,
                phase=phase,
                val_dice=val_dice,
                message=message,
                train_seconds=self.session_train_seconds,
            )
        )
