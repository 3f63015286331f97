"""The training pipeline, torchvision-reference style: stage functions read top to bottom, then main(cfg).

    load_data -> build_model -> build_optimizer -> build_scheduler -> [train_one_epoch -> evaluate
    -> save] x epochs -> final outputs

``main(cfg)`` is also the programmatic entry point (the ablation grid and the tests call it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import plots
from trainer.checkpoint import SCHEMA_VERSION, CheckpointError, git_commit, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.cuda import c_compiler, configure_cuda, why_no_cuda
from trainer.data import DatasetInfo, Split, load_dataset, to_float
from trainer.distributed import DistInfo, barrier, cleanup, device_for, init_distributed
from trainer.engine import ModelEMA, autocast, evaluate, train_one_epoch
from trainer.hostmem import tune_malloc
from trainer.meta import ModelMeta
from trainer.models import count_parameters, get_model
from trainer.outputs import (
    check_output_dir,
    cpu_state_dict,
    restore_rng_state,
    rng_state,
    write_confusion_csv,
    write_json,
    write_metrics_jsonl,
)
from trainer.precision import cpu_supports_bf16, resolve_precision
from trainer.progress import mode_for


class ResumeError(RuntimeError):
    """--resume points at something that cannot continue this run."""


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda was asked for but torch.cuda.is_available() is False: {why_no_cuda()}"
        )
    return requested


def load_data(cfg: TrainConfig, device: torch.device) -> tuple[DatasetInfo, Split, Split]:
    """Decode the dataset once and put both splits on the training device as uint8 tensors."""
    # The dataset's own seed is fixed: runs with different --seed see the same (synthetic) data.
    info, train, test = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, seed=0)
    if cfg.max_train is not None and cfg.max_train < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_train]
        train = Split(x=train.x[keep].contiguous(), y=train.y[keep].contiguous())
    train = Split(x=train.x.to(device), y=train.y.to(device))  # (N, C, H, W) uint8, (N,) int64
    test = Split(x=test.x.to(device), y=test.y.to(device))
    return info, train, test


def augmentation(mode: str, info: DatasetInfo) -> DatasetInfo | None:
    """The DatasetInfo that ``data.augment`` reads for this mode (None: no augmentation)."""
    flip = "flip" in mode and info.hflip
    crop = info.crop_padding if "crop" in mode else 0
    if not flip and not crop:
        return None
    return dataclasses.replace(info, hflip=flip, crop_padding=crop)


def init_weights(model: nn.Module, scheme: str) -> None:
    """'xavier' is seed 000's d2l init (uniform on conv/linear weights); 'kaiming' suits ReLU nets."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def build_model(cfg: TrainConfig, info: DatasetInfo) -> tuple[nn.Module, dict[str, Any]]:
    """The model (seeded init) and the keyword args that rebuild it from a checkpoint."""
    model_args = {
        "in_channels": info.channels,
        "num_classes": info.num_classes,
        "image_size": info.image_size,
        **cfg.model_knobs(),
    }
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.arch, **model_args)
    init_weights(model, cfg.init)
    return model, model_args


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on conv/linear weights only: decaying biases and BN scales just fights the norm.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of cfg.lr after ``step`` optimizer steps: linear warmup, then the schedule."""
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        # One-cycle: from lr/25 up to lr (over warmup, 25% of the run by default), then cosine to ~0.
        warm = warm or max(1, round(0.25 * total))
        if step < warm:
            return 1 / 25 + (1 - 1 / 25) * step / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 1e-4 / 25 + (1 - 1e-4 / 25) * 0.5 * (1 + math.cos(math.pi * t))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr_gamma ** ((step // steps_per_epoch) // cfg.lr_step_epochs)
    return 1.0  # constant


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (not per epoch), so warmup and cosine are smooth."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))


def compile_model(
    model: nn.Module, train: Split, info: DatasetInfo, batch_size: int, precision: str, channels_last: bool
) -> tuple[nn.Module, float]:
    """``torch.compile(model)``, compiled now on one training batch so the epochs time training only.

    The warm-up step leaves no trace: BatchNorm statistics are restored, gradients cleared and the
    random streams forked. Inductor's cache lives in the checkout's ``.cache/inductor``. On a CPU,
    Inductor builds C++: without a compiler that is a clear error here, not a traceback mid-epoch.
    """
    device = train.x.device
    if device.type == "cpu" and not (
        os.environ.get("CXX") or any(map(shutil.which, ("c++", "g++", "clang++")))
    ):
        raise ValueError(
            "--compile on a CPU needs a C++ compiler (Inductor builds C++): install g++ or drop --compile"
        )
    if device.type == "cuda" and c_compiler() is None:
        raise ValueError(
            "--compile on CUDA needs a C compiler (Triton builds its kernel launchers): install gcc or drop --compile"
        )
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache/inductor")
    )
    compiled: nn.Module = torch.compile(model)  # type: ignore[assignment]  # an OptimizedModule
    x = to_float(train.x[:batch_size], info)  # (B, C, H, W), the shape every step has
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # BN running statistics
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(compiled(x), train.y[:batch_size])
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    return compiled, seconds


def load_resume_checkpoint(cfg: TrainConfig, model_args: dict[str, Any]) -> dict[str, Any]:
    path = Path(cfg.resume or "")
    if path.is_dir():
        path = path / "checkpoint.pt"  # the latest epoch, not best.pt
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise ResumeError(f"cannot resume: {e}") from e
    if ckpt["arch"] != cfg.arch:
        raise ResumeError(
            f"cannot resume: {path} holds a '{ckpt['arch']}' model but this run's arch is '{cfg.arch}'; "
            f"resume with --arch {ckpt['arch']} (or leave --arch out) or start a new run in another --out"
        )
    dataset = ckpt["meta"]["dataset"]
    if dataset != cfg.dataset:
        raise ResumeError(f"cannot resume: {path} was trained on '{dataset}', this run is on '{cfg.dataset}'")
    if ckpt["model_args"] != model_args:
        raise ResumeError(f"cannot resume: {path} has model args {ckpt['model_args']}, this run {model_args}")
    if ckpt.get("optimizer") is None or ckpt.get("scheduler") is None:
        raise ResumeError(
            f"cannot resume: {path} has no optimizer/scheduler state (not a training checkpoint)"
        )
    return ckpt


def log(msg: str, dist_info: DistInfo) -> None:
    if dist_info.is_main:
        print(msg, flush=True)


def main(cfg: TrainConfig, on_epoch_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``cfg``; returns the summary (also written to ``cfg.out``/summary.json on rank 0).

    ``on_epoch_start(epoch)``, for programs that drive the trainer, runs before each epoch's training
    (after the previous epoch's evaluation and outputs), outside the timed training loop.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    device_type = resolve_device(cfg.device)
    # Before anything slow (data, model, process group): a bad --out must not cost a training run.
    if int(os.environ.get("RANK", "0")) == 0:
        check_output_dir(out, resuming=cfg.resume is not None, overwrite=cfg.overwrite)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dist_info = init_distributed(device_type)
    try:
        device = device_for(device_type, dist_info)
        cuda_line = configure_cuda(device)  # cudnn.benchmark, TF32
        if cuda_line:
            log(cuda_line, dist_info)
        return _run(cfg, out, device, dist_info, t0, on_epoch_start)
    finally:
        cleanup(dist_info)


def _run(
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    dist_info: DistInfo,
    t0: float,
    on_epoch_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    if cfg.batch_size % dist_info.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must divide by the {dist_info.world_size} processes")
    batch_size = cfg.batch_size // dist_info.world_size  # per process
    malloc_tuned = tune_malloc() if cfg.tune_malloc else False  # before the big allocations
    log(f"loading {cfg.dataset}{f' from {cfg.data_dir}' if cfg.data_dir else ''}", dist_info)
    t_data = time.perf_counter()
    info, train, test = load_data(cfg, device)
    log(
        f"loaded {len(train):,} train / {len(test):,} test images in {time.perf_counter() - t_data:.1f} s",
        dist_info,
    )
    steps_per_epoch = (len(train) // dist_info.world_size) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is larger than the training set ({len(train)} images)"
        )
    tta_flip = cfg.tta_flip and info.hflip
    if (cfg.tta_flip or "flip" in cfg.augment) and not info.hflip:
        log(
            f"note: no flips (augmentation or TTA): a mirrored {info.name} image may change its label",
            dist_info,
        )
    aug_info = augmentation(cfg.augment, info)
    meta = ModelMeta(cfg.arch, info.name, info.input_shape, info.mean, info.std, info.class_names)

    model, model_args = build_model(cfg, info)
    if cfg.precision == "auto" and device.type == "cpu" and cpu_supports_bf16():
        log("precision auto: checking whether this CPU trains this model faster in bf16", dist_info)
    choice = resolve_precision(
        cfg.precision, device, model, input_shape=info.input_shape, num_classes=info.num_classes,
        batch_size=batch_size, channels_last=cfg.channels_last, dist_info=dist_info,
    )  # fmt: skip
    precision = choice.precision
    log(choice.describe(cfg.precision), dist_info)
    ckpt = load_resume_checkpoint(cfg, model_args) if cfg.resume else None
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
    params = count_parameters(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch, history, best_acc = 0, [], -1.0
    if ckpt is not None:
        # With EMA, state_dict is the evaluated EMA copy and train_state_dict the optimized weights.
        model.load_state_dict(ckpt.get("train_state_dict") or ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["state_dict"])
            ema.updates = int(ckpt.get("ema_updates", 0))
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("rng"):
            restore_rng_state(ckpt["rng"], device)
        start_epoch = int(ckpt["epoch"])
        history = [dict(r) for r in ckpt.get("history", []) if r["epoch"] <= start_epoch]
        best_acc = max((r["test_acc"] for r in history), default=-1.0)
        log(f"resumed from {cfg.resume} after epoch {start_epoch}", dist_info)

    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    compile_s = None
    if cfg.compile:
        log("torch.compile: compiling the training step (once, before the timed epochs)", dist_info)
        train_model, compile_s = compile_model(
            train_model, train, info, batch_size, precision, cfg.channels_last
        )
        log(f"torch.compile: ready in {compile_s:.1f} s", dist_info)
    eval_model = ema.module if ema is not None else model
    log(
        f"training {cfg.arch} ({params:,} params) on {info.name} ({len(train)} train / {len(test)} test) "
        f"device {device} x{dist_info.world_size} precision {precision} batch {cfg.batch_size} "
        f"epochs {cfg.epochs} -> {out}",
        dist_info,
    )
    progress = mode_for(cfg.quiet, dist_info.is_main)
    commit = git_commit() if dist_info.is_main else None
    result = None
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(
            train_model, criterion, optimizer, scheduler, train, info,
            epoch=epoch, epochs=cfg.epochs, batch_size=batch_size, seed=cfg.seed, aug_info=aug_info,
            precision=precision, channels_last=cfg.channels_last, dist_info=dist_info, ema=ema,
            scaler=scaler, progress=progress,
        )  # fmt: skip
        last = epoch == cfg.epochs
        result = evaluate(
            eval_model, test, info, batch_size=cfg.eval_batch_size, precision=precision,
            channels_last=cfg.channels_last, dist_info=dist_info, tta_flip=tta_flip and last,
        )  # fmt: skip
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": stats.loss,
            "train_acc": stats.acc,
            "test_loss": result.loss,
            "test_acc": result.acc,
            "lr": lr,
            "images_per_s": stats.images_per_s,
            "seconds": stats.seconds,
        }
        if result.acc_tta is not None:
            record["test_acc_tta"] = result.acc_tta
        if stats.skipped:
            record["skipped_steps"] = stats.skipped  # fp16 steps GradScaler skipped (overflow)
        history.append(record)
        log(
            f"epoch {epoch}/{cfg.epochs}  train_loss {stats.loss:.4f}  train_acc {stats.acc:.4f}  "
            f"test_loss {result.loss:.4f}  test_acc {result.acc:.4f}"
            + (f"  test_acc_tta {result.acc_tta:.4f}" if result.acc_tta is not None else "")
            + f"  lr {lr:.4g}  {stats.images_per_s:,.0f} img/s  {stats.seconds:.1f}s"
            + (f"  {stats.skipped} fp16 step(s) skipped" if stats.skipped else ""),
            dist_info,
        )
        if dist_info.is_main:
            ckpt_out = {
                "schema_version": SCHEMA_VERSION,
                "arch": cfg.arch,
                "model_args": model_args,
                "meta": meta.to_dict(),
                "state_dict": cpu_state_dict(eval_model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "metrics": dict(record),
                "config": cfg.to_dict(),
                "torch_version": str(torch.__version__),
                "git_commit": commit,
                "rng": rng_state(device),
                "history": history,
                "precision": precision,
                "world_size": dist_info.world_size,
            }
            if ema is not None:
                ckpt_out["train_state_dict"] = cpu_state_dict(model)
                ckpt_out["ema_updates"] = ema.updates
            if scaler is not None:
                ckpt_out["scaler"] = scaler.state_dict()
            save_checkpoint(out / "checkpoint.pt", ckpt_out)
            if result.acc > best_acc:
                best_acc = result.acc
                save_checkpoint(out / "best.pt", ckpt_out)
            write_metrics_jsonl(out / "metrics.jsonl", history)
    barrier(dist_info)

    if result is None:  # resumed a run that had already finished all its epochs
        log(f"nothing to do: {cfg.resume} already trained {start_epoch} of {cfg.epochs} epochs", dist_info)
        return {"test_acc": history[-1]["test_acc"] if history else None, "epochs": start_epoch}
    summary = {
        "test_acc": result.acc,
        "test_acc_tta": result.acc_tta,
        "tta_flip": tta_flip,
        "test_loss": result.loss,
        "best_test_acc": best_acc,
        "best_epoch": max(history, key=lambda r: r["test_acc"])["epoch"],
        "per_class_acc": dict(zip(info.class_names, result.per_class_acc(), strict=True)),
        "params": params,
        "wall_time_s": time.perf_counter() - t0,
        "train_time_s": sum(r["seconds"] for r in history),
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "arch": cfg.arch,
        "dataset": info.name,
        "preset": cfg.preset,
        "epochs": cfg.epochs,
        "precision": precision,
        "device": str(device),
        "world_size": dist_info.world_size,
        "ema_decay": cfg.ema_decay,
        "malloc_tuned": malloc_tuned,
        "compile_s": compile_s,
        "config": dataclasses.asdict(cfg),
    }
    if dist_info.is_main:
        title = f"{cfg.arch} on {info.name}"
        write_confusion_csv(out / "confusion_matrix.csv", result.confusion.tolist(), info.class_names)
        plots.plot_confusion(result.confusion.tolist(), info.class_names, out / "confusion_matrix.png", title)
        plots.plot_curves(history, out / "curves.png", title)
        summary["wall_time_s"] = time.perf_counter() - t0
        write_json(out / "summary.json", summary)
        log(
            f"done: test_acc {result.acc:.4f}"
            + (f" (flip TTA {result.acc_tta:.4f})" if result.acc_tta is not None else "")
            + f" best {best_acc:.4f}  wall {summary['wall_time_s']:.1f}s  outputs in {out}",
            dist_info,
        )
    return summary
