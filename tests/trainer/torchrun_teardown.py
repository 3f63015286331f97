"""One torchrun rank for ``test_ddp.py``: train with ``trainer.train.main``, then say which of the
threads that ``init_process_group`` started (gloo's worker and I/O threads) are still alive.

``python -m torch.distributed.run ... torchrun_teardown.py OUT REPORTS returns|raises`` writes one JSON
file per rank, ``REPORTS/rank-N.json``: ``{"rank", "raised", "started", "alive"}`` (thread ids). Files,
not stdout: torchrun merges the ranks' stdout, and two lines written at once may come out as one. ``raises`` stops the run from the
``on_epoch_start`` hook before epoch 2 and looks while the exception is still held, as a caller
handling it would. Threads alive at that point are threads alive when the interpreter exits.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainer.config import TrainConfig
from trainer.train import main as train_main


class StopRun(RuntimeError):
    """Raised from the epoch hook: the path of an error in the middle of training."""


def thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def main(out: str, reports: str, how: str) -> None:
    started: set[int] = set()
    init_process_group = dist.init_process_group

    def recording_init(*args: Any, **kwargs: Any) -> None:
        before = thread_ids()
        init_process_group(*args, **kwargs)
        started.update(thread_ids() - before)

    dist.init_process_group = recording_init

    def stop_before_epoch_2(epoch: int) -> None:
        if epoch == 2:
            raise StopRun("stopped by the test")

    cfg = TrainConfig(
        dataset="synthetic",
        max_train=256,
        epochs=2,
        batch_size=64,
        precision="fp32",
        quiet=True,
        out=out,
    )
    raised = False
    try:
        train_main(cfg, on_epoch_start=stop_before_epoch_2 if how == "raises" else None)
        alive = thread_ids() & started
    except StopRun:
        raised = True
        alive = thread_ids() & started
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "raised": raised, "started": sorted(started), "alive": sorted(alive)}
    path = Path(reports) / f"rank-{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(report))
    path.with_suffix(".tmp").replace(path)  # whole or absent: the test reads it after torchrun exits


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
