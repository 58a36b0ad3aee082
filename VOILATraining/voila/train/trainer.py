"""The VOILA trainer: CPU, one GPU, or several GPUs/nodes under ``torchrun`` (DistributedDataParallel).

One optimiser step = ``accumulate`` micro-batches of ``batch_size`` random patches per process;
the loss is ``CE + F1 + MSE + λ·KLD`` over CAS-selected voxels (:meth:`VoilaModel.losses`).
Adam with an optional warm-up + cosine schedule; AMP (bf16, or fp16 with a GradScaler) on CUDA.

The run folder holds ``checkpoints/{last,best}.pt`` (training state, ``weights_only`` loadable),
``metrics.csv``, ``tensorboard/``, ``curves.png``, ``validation.png``, ``train.log``, the
resolved ``config.yaml`` and, at the end, the exported model (one ``.safetensors``).

Resuming restores weights, optimiser, scheduler, scaler, every RNG and the position inside the
epoch; the items of an epoch and their augmentation are pure functions of ``(seed, epoch, item)``,
so a run killed with SIGKILL and resumed ends with the same weights as one never interrupted.

Example::

    trainer = Trainer(load_train_config("train.yaml"), progress=print, stop=threading.Event())
    model_path = trainer.run()
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from voila.data.io import atomic_path
from voila.data.preprocess import PreprocessingConfig
from voila.errors import ConfigError, TrainingError, VoilaError
from voila.model.config import ModelConfig, load_preset
from voila.model.voila import VoilaModel
from voila.train.checkpoint import (
    RunLock,
    capture_rng,
    check_output_folder,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from voila.train.config import TrainConfig
from voila.train.data import PatchDataset, TrainingData, epoch_keys, patch_transforms
from voila.train.report import MetricsTable, TensorBoardLog, plot_curves, plot_validation

LOG = logging.getLogger("voila.train")
LOSS_KEYS = ("loss", "ce", "f1", "cas_mse", "cas_kld")


@dataclass
class TrainingProgress:
    """What the progress callback receives (also readable as ``progress["loss"]``).

    ``epoch`` is 1-based; ``step``/``total`` count optimiser steps of the whole run; ``eta`` is
    seconds to the end (training steps only), or None before the first step.
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

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Distributed:
    """Rank bookkeeping; a no-op without ``torchrun`` (``WORLD_SIZE`` unset or 1)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        self.started = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> None:
        self.device = device
        if not self.active or torch.distributed.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        self.started = True

    def any(self, *flags: bool) -> list[bool]:
        """Element-wise OR of boolean flags over all processes."""
        if not self.active:
            return list(flags)
        tensor = torch.tensor([float(f) for f in flags], device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return [bool(v > 0) for v in tensor.tolist()]

    def broadcast(self, value: Any) -> Any:
        if not self.active:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def stop(self) -> None:
        if self.started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _LossComputer(nn.Module):
    """Puts :meth:`VoilaModel.losses` behind ``forward`` so DistributedDataParallel syncs it."""

    def __init__(self, model: VoilaModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, ct: torch.Tensor, labels: torch.Tensor, features: torch.Tensor, annotated: torch.Tensor
    ):
        return self.model.losses(ct, labels, features, annotated)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _resolve_device(name: str, dist: _Distributed) -> torch.device:
    from voila.infer.sliding_window import resolve_device

    if dist.active and name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", dist.local_rank)
    else:
        device = resolve_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


class Trainer:
    """One training run. ``progress`` gets a :class:`TrainingProgress` per optimiser step and
    phase change; setting ``stop`` ends the run cleanly (checkpoint + exported model)."""

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
        self.dist = _Distributed()
        self.out = config.out_dir
        self.lock: RunLock | None = None
        self.tensorboard: TensorBoardLog | None = None
        self._log_handler: logging.Handler | None = None
        self.session_steps, self.session_train_seconds = 0, 0.0
        self.best_scores: dict[str, float] = {}
        self.commands = [config.command]

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.lock is not None:
                self.lock.release()
            if self._log_handler is not None:
                LOG.removeHandler(self._log_handler)
                self._log_handler.close()
            self.dist.stop()

    def _run(self) -> Path:
        config, dist = self.config, self.dist
        self.session_start = time.monotonic()
        device = _resolve_device(config.device, dist)
        dist.start(device)
        self.device = device
        self.amp_dtype = self._amp_dtype(device)
        if config.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

        model_config = self._model_config()
        self.model_config = model_config
        self.preprocessing = PreprocessingConfig(spacing=tuple(config.spacing))
        self._agree(self._claim_folder)
        self._start_log_file()
        LOG.info("voila train: %s", config.command or "(python API)")
        LOG.info("device %s, %d process(es), amp %s", device, dist.world, self.amp_dtype)

        from voila.vocabulary import Vocabulary

        vocabulary = Vocabulary.load()
        self.vocabulary = vocabulary
        data = self._agree(
            lambda: TrainingData.prepare(
                config.data,
                self.preprocessing,
                vocabulary,
                val_fraction=config.val_fraction,
                seed=config.seed,
                cache=config.cache,
                cache_dir=self.out / "cache",
                need_validation_cases=dist.main,
            ),
            everywhere=True,
        )
        self.data = data
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

        resume_state = load_checkpoint(self.out / "checkpoints" / "last.pt") if config.resume else None
        if resume_state is not None:
            if list(resume_state["classes"]) != data.class_names:
                raise ConfigError(
                    "the training data's structures differ from the checkpoint's "
                    f"({len(data.class_names) - 1} vs {len(resume_state['classes']) - 1}); "
                    "resume with the same --data, or start a new run with another --out"
                )
            features = resume_state["text_features"]
        else:
            features = self._agree(self._encode_texts)
        self.features = features.to(device)

        _seed_everything(config.seed)
        model = VoilaModel(model_config, text_dim=features.shape[1], num_classes=len(data.class_names)).to(
            device
        )
        self.model = model
        _seed_everything(_derived_seed(config.seed, dist.rank, 1))

        self.steps_per_epoch = config.steps_per_epoch or max(
            1, math.ceil(len(data.train_indices) / (config.batch_size * config.accumulate * dist.world))
        )
        self.total_steps = self.steps_per_epoch * config.epochs
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_dice, self.best_epoch, self.elapsed_before = -1.0, -1, 0.0
        self.last_validation: dict[str, Any] | None = None
        if resume_state is not None:
            self._restore(resume_state)
        if self.epoch >= config.epochs:
            LOG.info("the run already finished its %d epochs; exporting the model again", config.epochs)
            return self._agree(self._export)

        self.metrics = MetricsTable(self.out / "metrics.csv", data.class_names)
        if dist.main:
            self.metrics.load(before_epoch=self.epoch)
            self.tensorboard = TensorBoardLog(self.out / "tensorboard", purge_step=self.global_step or None)

        self.train_module: nn.Module = _LossComputer(model)
        if dist.active:
            self.train_module = nn.parallel.DistributedDataParallel(
                self.train_module, device_ids=[device.index] if device.type == "cuda" else None
            )
        crop, augmentation = patch_transforms(
            self.preprocessing,
            model_config.patch_size,
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
                validate = (finished_epoch + 1) % config.val_every == 0 or finished_epoch + 1 == config.epochs
                scores = self._validate() if validate else None
                self.epoch, self.step_in_epoch = finished_epoch + 1, 0
                self._end_of_epoch(finished_epoch, scores)
        finally:
            if bar is not None:
                bar.close()
        if stopped_reason:
            LOG.info("stopped: %s", stopped_reason)
            self._save_state(best=False)
            if stopped_reason.startswith("time") and self.last_validation_step != self.global_step:
                scores = self._validate()
                self._record_final_validation(scores)
        path = self._agree(self._export)
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
            for micro in range(config.accumulate):
                batch = next(batches)
                # plain tensors: MONAI's MetaTensor dispatch on every op only costs time here
                image, label, annotated = (
                    torch.as_tensor(batch[key]).as_subclass(torch.Tensor).to(self.device, non_blocking=True)
                    for key in ("image", "label", "annotated")
                )
                last_micro = micro == config.accumulate - 1
                sync = (
                    self.train_module.no_sync()
                    if dist.active and not last_micro
                    else contextlib.nullcontext()
                )
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
                    sums[key] += value
                count += 1
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.global_step += 1
            self.step_in_epoch = step + 1
            self.session_steps += 1
            self.session_train_seconds += time.monotonic() - started
            running = {key: value / count for key, value in sums.items()}
            self.running_losses = running
            if self.tensorboard is not None:
                self.tensorboard.scalars(
                    {"loss": losses.scalars()["loss"], "lr": self.optimizer.param_groups[0]["lr"]},
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

    # -- validation, records, checkpoints -------------------------------------------------
    last_validation_step = -1

    def _validate(self) -> dict[str, Any] | None:
        """Sliding-window prediction of every validation case (rank 0); Dice per structure."""
        self.last_validation_step = self.global_step
        if not self.dist.main:
            self.dist.barrier()
            return None
        from voila.evaluate.metrics import dice
        from voila.infer.sliding_window import predict_grid

        self._report("validate", loss=getattr(self, "running_losses", {}).get("loss"))
        model = self.model
        model.eval()
        started = time.monotonic()
        with torch.no_grad():
            embeddings = model.class_embeddings(self.features).float()
        names = self.data.class_names
        per_class: dict[int, list[float]] = {c: [] for c in range(1, len(names))}
        picture = None
        for index in self.data.val_indices:
            case = self.data.cases[index]
            image, label = case.volumes()
            prediction = predict_grid(
                model,
                embeddings,
                image.as_tensor(),
                self.model_config.patch_size,
                overlap=self.config.val_overlap,
                device=self.device,
                amp_dtype=self.amp_dtype,
            )
            predicted = prediction.labels.numpy()
            reference = label.as_tensor()[0].numpy().astype(np.int64)
            for c in range(1, len(names)):
                if bool(case.annotated[c]):
                    score = dice(predicted == c, reference == c)
                    if not math.isnan(score):
                        per_class[c].append(score)
            if picture is None:
                heatmap = prediction.heatmap.numpy() if prediction.heatmap is not None else None
                picture = (case, image.as_tensor()[0].numpy(), reference, predicted, heatmap)
        model.train()
        scores = {names[c]: float(np.mean(v)) for c, v in per_class.items() if v}
        mean = float(np.mean(list(scores.values()))) if scores else float("nan")
        LOG.info(
            "validation after epoch %d: mean Dice %.4f over %d structures (%.1f s)",
            self.epoch + 1,
            mean,
            len(scores),
            time.monotonic() - started,
        )
        if picture is not None:
            case, ct, reference, predicted, heatmap = picture
            plot_validation(
                self.out / "validation.png",
                ct,
                reference,
                predicted,
                heatmap,
                self._class_colors(),
                f"{case.dataset}/{case.case_id}, epoch {self.epoch + 1}, mean Dice {mean:.3f}",
            )
        self.dist.barrier()
        return {"mean": mean, "per_class": scores}

    def _class_colors(self) -> np.ndarray:
        colors = []
        for i, name in enumerate(self.data.class_names):
            if name in self.vocabulary:
                colors.append(np.asarray(self.vocabulary[name].color, dtype=float) / 255.0)
            else:
                rng = np.random.default_rng(i)
                colors.append(rng.uniform(0.3, 1.0, size=3))
        return np.vstack(colors)

    def _end_of_epoch(self, finished_epoch: int, scores: dict[str, Any] | None) -> None:
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
            if scores is not None and not math.isnan(scores["mean"]):
                row["val_dice"] = round(scores["mean"], 6)
                row.update({f"dice_{k}": round(v, 6) for k, v in scores["per_class"].items()})
                self.last_validation = scores
                improved = scores["mean"] > self.best_dice
                if improved:
                    self.best_dice, self.best_epoch = scores["mean"], finished_epoch
                    self.best_scores = scores["per_class"]
            self.metrics.append(row)
            if self.tensorboard is not None:
                self.tensorboard.scalars(self.epoch_losses, finished_epoch, "epoch")
                if row["val_dice"] is not None:
                    self.tensorboard.scalars({"mean_dice": row["val_dice"]}, finished_epoch, "validation")
                    self.tensorboard.scalars(scores["per_class"], finished_epoch, "validation_dice")
            plot_curves(self.out / "curves.png", self.metrics.rows)
        self._save_state(best=improved)
        self._report(
            "train", loss=self.epoch_losses.get("loss"), val_dice=None if scores is None else scores["mean"]
        )

    def _record_final_validation(self, scores: dict[str, Any] | None) -> None:
        improved = False
        if scores is not None and not math.isnan(scores["mean"]):
            self.last_validation = scores
            LOG.info("final validation: mean Dice %.4f", scores["mean"])
            if scores["mean"] > self.best_dice:
                self.best_dice, self.best_epoch, self.best_scores = (
                    scores["mean"],
                    self.epoch,
                    scores["per_class"],
                )
                improved = True
        if self.dist.broadcast(improved):
            self._save_state(best=True, last=False)

    def _state(self) -> dict[str, Any]:
        config = self.config
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
            "config": config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "elapsed_seconds": self.elapsed_before + time.monotonic() - self.session_start,
            "commands": list(self.commands),
        }

    def _save_state(self, best: bool, last: bool = True) -> None:
        state = self._state()  # every rank: gathers the RNG states
        if not self.dist.main:
            return
        folder = self.out / "checkpoints"
        if last:
            save_checkpoint(folder / "last.pt", state)
        if best:
            save_checkpoint(folder / "best.pt", state)

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
        self.scheduler.base_lrs = [config.lr for _ in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = config.lr
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
            _seed_everything(_derived_seed(config.seed, self.dist.rank, self.global_step))
        LOG.info(
            "resumed at epoch %d, step %d (global step %d)",
            self.epoch + 1,
            self.step_in_epoch,
            self.global_step,
        )

    def _diverged(self) -> None:
        last = self.out / "checkpoints" / "last.pt"
        kept = (
            f"the last good checkpoint {last} is kept"
            if last.is_file()
            else "no checkpoint had been written yet"
        )
        raise TrainingError(
            f"the training loss became NaN/Inf at epoch {self.epoch + 1}, step {self.global_step + 1}; "
            f"training stopped and {kept}. Lower --lr (now {self.config.lr:g})"
            + (" or use amp bf16/none" if self.amp_dtype is not None else "")
            + " and continue with --resume"
        )

    # -- model file ------------------------------------------------------------------------
    def _export(self) -> Path:
        from voila.model.model_file import build_card, save_model
        from voila.model.text_encoder import TextEmbeddingCache

        config = self.config
        best = self.out / "checkpoints" / "best.pt"
        model = VoilaModel(self.model_config, self.features.shape[1], num_classes=len(self.data.class_names))
        source = "last"
        if best.is_file():
            model.load_state_dict(load_checkpoint(best)["model"])
            source = f"best (epoch {self.best_epoch + 1}, mean Dice {self.best_dice:.4f})"
        else:
            model.load_state_dict({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        cache = TextEmbeddingCache(self.data.class_texts, self.features.detach().cpu().float())
        card = build_card(
            self.model_config,
            self.data.class_names,
            self.vocabulary.to_dict(),
            self.preprocessing.to_dict(),
            int(self.features.shape[1]),
            _template(),
            training=self._training_record(source),
            description=config.description or self._default_description(),
            intended_use=config.intended_use,
        )
        path = config.export_path
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(path, model, card, cache)
        LOG.info("model exported to %s (%s weights)", path, source)
        return path

    def _default_description(self) -> str:
        names = ", ".join(d["name"] for d in self.data.datasets)
        return (
            f"VOILA ({self.model_config.name} preset) trained with `voila train` on {names} "
            f"({len(self.data.train_indices)} training cases, {len(self.data.class_names) - 1} structures)"
        )

    def _training_record(self, source: str) -> dict[str, Any]:
        config, data = self.config, self.data
        tag = self.model_config.text_encoder.pretrained
        minutes = (self.elapsed_before + time.monotonic() - self.session_start) / 60
        sampling = self.model_config.sampling
        summary = (
            f"{self.model_config.name} preset, {len(data.train_indices)} training case(s) from "
            f"{len(data.datasets)} dataset(s), {self.epoch} epoch(s) x {self.steps_per_epoch} steps, "
            f"{sampling.mode} sampling, {config.spacing[0]:g} mm grid; "
            + (
                f"best validation mean Dice {self.best_dice:.3f} (epoch {self.best_epoch + 1})"
                + (" on the training cases" if data.validating_on_training_cases else "")
                if self.best_epoch >= 0
                else "not validated"
            )
        )
        import voila

        return {
            "command": self.commands[0],
            "resumed_with": self.commands[1:],
            "summary": summary,
            "notes": config.notes,
            "datasets": data.datasets,
            "train_cases": len(data.train_indices),
            "val_cases": len(data.val_indices),
            "validated_on_training_cases": data.validating_on_training_cases,
            "skipped_cases": [{"case": c, "reason": r} for c, r in data.skipped],
            "epochs_completed": self.epoch,
            "optimizer_steps": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": config.batch_size,
            "accumulate": config.accumulate,
            "processes": self.dist.world,
            "patch_size": list(self.model_config.patch_size),
            "spacing_mm": list(config.spacing),
            "optimizer": "Adam",
            "lr": config.lr,
            "schedule": config.schedule,
            "warmup_epochs": config.warmup_epochs,
            "seed": config.seed,
            "sampling": asdict(sampling),
            "augment": config.augment,
            "mirror": config.mirror,
            "foreground_oversampling": config.foreground_oversampling,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
            "device": str(self.device),
            "text_encoder_weights": tag
            or "none: open_clip architecture with deterministic random weights (pretrained=None, seed 0)",
            "exported_weights": source,
            "val_mean_dice": None if self.best_epoch < 0 else round(self.best_dice, 4),
            "val_dice": {k: round(v, 4) for k, v in self.best_scores.items()},
            "minutes": round(minutes, 2),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "voila_version": voila.__version__,
            "torch_version": torch.__version__,
        }

    # -- setup helpers ---------------------------------------------------------------------
    def _agree(self, function: Callable[[], Any], everywhere: bool = False) -> Any:
        """Run ``function`` on rank 0 (or on every rank) and raise the same error on all ranks."""
        result, error = None, None
        if everywhere or self.dist.main:
            try:
                result = function()
            except VoilaError as caught:
                error = caught
        errors = self.dist.gather(None if error is None else (type(error).__name__, str(error)))
        failure = next((e for e in errors if e is not None), None)
        if failure is not None:
            if error is not None:
                raise error
            import voila.errors as errors_module

            raise getattr(errors_module, failure[0], VoilaError)(failure[1])
        if not everywhere:
            result = self.dist.broadcast(result)
        return result

    def _claim_folder(self) -> None:
        config = self.config
        check_output_folder(self.out)
        self.lock = RunLock(self.out)
        self.lock.acquire()
        last = self.out / "checkpoints" / "last.pt"
        if config.resume:
            if not last.is_file():
                raise TrainingError(
                    f"nothing to resume in {self.out} (no checkpoints/last.pt); start without --resume"
                )
        elif last.is_file() or (self.out / "metrics.csv").is_file():
            finished = " finished" if config.export_path.is_file() else ""
            raise TrainingError(
                f"{self.out} already holds a{finished} training run; use --resume to continue it, "
                "or choose another --out"
            )
        snapshot = dict(config.to_dict(), resume=config.resume)
        with atomic_path(self.out / "config.yaml") as partial:
            partial.write_text(yaml.safe_dump(snapshot, sort_keys=False), encoding="utf-8")

    def _start_log_file(self) -> None:
        if not self.dist.main:
            return
        handler = logging.FileHandler(self.out / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        LOG.addHandler(handler)
        if LOG.level == logging.NOTSET or LOG.level > logging.INFO:
            LOG.setLevel(logging.INFO)
        self._log_handler = handler

    def _encode_texts(self) -> torch.Tensor:
        from voila.model.text_encoder import TextEncoder

        encoder_config = self.model_config.text_encoder
        LOG.info(
            "encoding %d class prompts with %s (%s)",
            len(self.data.class_texts),
            encoder_config.model_name,
            encoder_config.pretrained or "random weights",
        )
        encoder = TextEncoder(encoder_config.model_name, encoder_config.pretrained, device="cpu")
        return encoder.encode(self.data.class_texts)

    def _model_config(self) -> ModelConfig:
        config = self.config
        model_config = load_preset(config.preset)
        values = model_config.to_dict()
        if config.patch_size:
            values["patch_size"] = list(config.patch_size)
        if config.sampling:
            values["sampling"]["mode"] = config.sampling
        if config.sampling_ratio is not None:
            values["sampling"]["ratio"] = config.sampling_ratio
        if config.oversampling is not None:
            values["sampling"]["oversampling"] = config.oversampling
        values["text_encoder"]["pretrained"] = config.text_pretrained_tag(
            model_config.text_encoder.pretrained
        )
        return ModelConfig.from_dict(values)

    def _amp_dtype(self, device: torch.device) -> torch.dtype | None:
        amp = self.config.amp
        if device.type != "cuda" or amp == "none":
            if amp in ("bf16", "fp16") and device.type != "cuda":
                LOG.warning("amp %s needs a CUDA device; training in float32 on %s", amp, device)
            return None
        if amp == "auto":
            from voila.infer.sliding_window import default_amp_dtype

            return default_amp_dtype(device)
        return torch.bfloat16 if amp == "bf16" else torch.float16

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
            )
        )


def _template() -> str:
    from voila.vocabulary import DEFAULT_TEMPLATE

    return DEFAULT_TEMPLATE
