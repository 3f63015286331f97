"""The training run, torchvision-reference style: stage functions read top to bottom, then main(cfg).

    setup: load_data -> build_model -> choose_precision -> build_optimizer / build_scheduler
           -> restore (--resume) -> DDP, torch.compile
    [run_epoch: train_one_epoch -> evaluate; save] x epochs
    summarize -> write_outputs

``setup`` returns a ``trainer.run.Run``; ``main(cfg)`` is also the programmatic entry point (the
ablation grid and the tests call it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnstack.cli import ConfigError
from trainer import plots
from trainer.checkpoint import CheckpointError, git_commit
from trainer.config import TrainConfig
from trainer.cuda import configure_cuda, why_no_cuda
from trainer.data import DatasetError, DatasetInfo, Split, load_dataset
from trainer.distributed import DistInfo, barrier, device_for, process_group
from trainer.engine import (
    EpochPlan,
    EvalResult,
    ModelEMA,
    TrainState,
    compile_model,
    evaluate,
    train_one_epoch,
)
from trainer.hostmem import tune_malloc
from trainer.models import count_parameters, get_model
from trainer.optim import build_optimizer, build_scheduler
from trainer.outputs import (
    OutputDirError,
    check_output_dir,
    write_confusion_csv,
    write_json,
    write_metrics_jsonl,
)
from trainer.precision import cpu_supports_bf16, resolve_precision
from trainer.progress import mode_for
from trainer.resume import ResumeError, load_resume_checkpoint, restore
from trainer.run import Run

# What a user's input (flags, files, --out, --resume) can cause: a message and exit 2, no traceback.
INPUT_ERRORS = (ConfigError, OutputDirError, ResumeError, CheckpointError, DatasetError)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
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
    """'xavier' is d2l's init (uniform on conv/linear weights); 'kaiming' suits ReLU nets."""
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
    with process_group(device_type) as dist_info:
        device = device_for(device_type, dist_info)
        cuda_line = configure_cuda(device)  # cudnn.benchmark, TF32
        if cuda_line:
            log(cuda_line, dist_info)
        return _run(cfg, out, device, dist_info, t0, on_epoch_start)


def _run(
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    dist_info: DistInfo,
    t0: float,
    on_epoch_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    run = setup(cfg, out, device, dist_info)
    commit = git_commit() if dist_info.is_main else None
    result = None
    for epoch in range(run.start_epoch + 1, cfg.epochs + 1):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        result = run_epoch(run, epoch)
        if dist_info.is_main:
            save(run, epoch, result, commit)
    barrier(dist_info)
    if result is None:  # resumed a run that had already finished all its epochs
        log(
            f"nothing to do: {cfg.resume} already trained {run.start_epoch} of {cfg.epochs} epochs", dist_info
        )
        return {"test_acc": run.history[-1]["test_acc"] if run.history else None, "epochs": run.start_epoch}
    summary = run.summary(result, t0)
    if dist_info.is_main:
        write_outputs(run, result, summary, t0)
    return summary


# ---------------------------------------------------------------- setting up


def setup(cfg: TrainConfig, out: Path, device: torch.device, dist_info: DistInfo) -> Run:
    """Data, model, precision and optimizer, resumed from ``cfg.resume`` if asked, ready to train."""
    if cfg.batch_size % dist_info.world_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must divide by the {dist_info.world_size} processes"
        )
    batch_size = cfg.batch_size // dist_info.world_size  # per process
    malloc_tuned = tune_malloc() if cfg.tune_malloc else False  # before the big allocations
    info, train, test = load_data_announced(cfg, device, dist_info)
    steps_per_epoch = (len(train) // dist_info.world_size) // batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training set ({len(train)} images)"
        )
    if (cfg.tta_flip or "flip" in cfg.augment) and not info.hflip:
        log(
            f"note: no flips (augmentation or TTA): a mirrored {info.name} image may change its label",
            dist_info,
        )
    model, model_args = build_model(cfg, info)
    precision = choose_precision(cfg, device, model, info, batch_size, dist_info)
    ckpt = load_resume_checkpoint(cfg, model_args) if cfg.resume else None
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
    optimizer = build_optimizer(model, cfg)
    state = TrainState(
        model,
        nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        optimizer,
        build_scheduler(optimizer, cfg, steps_per_epoch),
        ema=ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
    )
    plan = EpochPlan(
        info,
        cfg.epochs,
        batch_size,
        cfg.seed,
        aug_info=augmentation(cfg.augment, info),
        precision=precision,
        channels_last=cfg.channels_last,
        dist_info=dist_info,
        progress=mode_for(cfg.quiet, dist_info.is_main),
    )
    run = Run(cfg, out, device, info, train, test, model, model_args, state, plan, malloc_tuned)
    if ckpt is not None:
        run.start_epoch, run.history = restore(ckpt, state, device)
        run.best_acc = max((r["test_acc"] for r in run.history), default=-1.0)
        log(f"resumed from {cfg.resume} after epoch {run.start_epoch}", dist_info)
    wrap_for_training(run)
    log(
        f"training {cfg.arch} ({count_parameters(model):,} params) on {info.name} ({len(train)} train / "
        f"{len(test)} test) device {device} x{dist_info.world_size} precision {precision} "
        f"batch {cfg.batch_size} epochs {cfg.epochs} -> {out}",
        dist_info,
    )
    return run


def load_data_announced(
    cfg: TrainConfig, device: torch.device, dist_info: DistInfo
) -> tuple[DatasetInfo, Split, Split]:
    """``load_data``, with a line before (decoding can take seconds) and after."""
    log(f"loading {cfg.dataset}{f' from {cfg.data_dir}' if cfg.data_dir else ''}", dist_info)
    t = time.perf_counter()
    info, train, test = load_data(cfg, device)
    log(
        f"loaded {len(train):,} train / {len(test):,} test images in {time.perf_counter() - t:.1f} s",
        dist_info,
    )
    return info, train, test


def choose_precision(
    cfg: TrainConfig,
    device: torch.device,
    model: nn.Module,
    info: DatasetInfo,
    batch_size: int,
    dist_info: DistInfo,
) -> str:
    """The precision to train in (``auto`` may time fp32 against bf16 first), said in one line."""
    if cfg.precision == "auto" and device.type == "cpu" and cpu_supports_bf16():
        log("precision auto: checking whether this CPU trains this model faster in bf16", dist_info)
    choice = resolve_precision(
        cfg.precision,
        device,
        model,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        batch_size=batch_size,
        channels_last=cfg.channels_last,
        dist_info=dist_info,
    )
    log(choice.describe(cfg.precision), dist_info)
    return choice.precision


def wrap_for_training(run: Run) -> None:
    """DistributedDataParallel across processes, then ``--compile``: what the steps call."""
    plan, device = run.plan, run.device
    if plan.dist_info.enabled:
        run.state.model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if run.cfg.compile:
        log("torch.compile: compiling the training step (once, before the timed epochs)", plan.dist_info)
        run.state.model, run.compile_s = compile_model(
            run.state.model, run.train, run.info, plan.batch_size, plan.precision, plan.channels_last
        )
        log(f"torch.compile: ready in {run.compile_s:.1f} s", plan.dist_info)


# ---------------------------------------------------------------- the epochs


def run_epoch(run: Run, epoch: int) -> EvalResult:
    """Train one epoch, evaluate (flip TTA after the last), log it; its record joins the history."""
    cfg = run.cfg
    lr = run.state.lr
    stats = train_one_epoch(run.state, run.train, run.plan, epoch=epoch)
    last = epoch == cfg.epochs
    result = evaluate(
        run.eval_model, run.test, run.plan, batch_size=cfg.eval_batch_size, tta_flip=run.tta_flip and last
    )
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
    run.history.append(record)
    log(
        f"epoch {epoch}/{cfg.epochs}  train_loss {stats.loss:.4f}  train_acc {stats.acc:.4f}  "
        f"test_loss {result.loss:.4f}  test_acc {result.acc:.4f}"
        + (f"  test_acc_tta {result.acc_tta:.4f}" if result.acc_tta is not None else "")
        + f"  lr {lr:.4g}  {stats.images_per_s:,.0f} img/s  {stats.seconds:.1f}s"
        + (f"  {stats.skipped} fp16 step(s) skipped" if stats.skipped else ""),
        run.plan.dist_info,
    )
    return result


def save(run: Run, epoch: int, result: EvalResult, commit: str | None) -> None:
    """checkpoint.pt (and best.pt when this epoch is the best so far), metrics.jsonl."""
    ckpt = run.checkpoint(epoch, commit)
    ckpt.save(run.out / "checkpoint.pt")
    if result.acc > run.best_acc:
        run.best_acc = result.acc
        ckpt.save(run.out / "best.pt")
    write_metrics_jsonl(run.out / "metrics.jsonl", run.history)


# ---------------------------------------------------------------- the end


def write_outputs(run: Run, result: EvalResult, summary: dict[str, Any], t0: float) -> None:
    """The confusion matrix (CSV, PNG), the curves, summary.json; then the closing line."""
    out, info, title = run.out, run.info, f"{run.cfg.arch} on {run.info.name}"
    write_confusion_csv(out / "confusion_matrix.csv", result.confusion.tolist(), info.class_names)
    plots.plot_confusion(result.confusion.tolist(), info.class_names, out / "confusion_matrix.png", title)
    plots.plot_curves(run.history, out / "curves.png", title)
    summary["wall_time_s"] = time.perf_counter() - t0
    write_json(out / "summary.json", summary)
    log(
        f"done: test_acc {result.acc:.4f}"
        + (f" (flip TTA {result.acc_tta:.4f})" if result.acc_tta is not None else "")
        + f" best {run.best_acc:.4f}  wall {summary['wall_time_s']:.1f}s  outputs in {out}",
        run.plan.dist_info,
    )
