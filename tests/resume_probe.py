"""A callback the resume tests pass to ``anomalib train``
(``--trainer.callbacks+=tests.resume_probe.ResumeProbe``).

It records, in files under ``$RESUME_PROBE_DIR``, what the tests cannot see from outside the process:
``progress`` (the last finished global step, rewritten after every step) and ``start.pt`` (global step,
optimizer and scheduler states at the first training batch, i.e. after Lightning restored a checkpoint).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class ResumeProbe(Callback):
    """Write the training state at the start and the step count after each step (test instrumentation)."""

    def __init__(self) -> None:
        self.folder = Path(os.environ["RESUME_PROBE_DIR"])
        self.folder.mkdir(parents=True, exist_ok=True)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # once, at the first batch: after every on_train_start hook (callbacks' and the model's)
        if (self.folder / "start.pt").exists():
            return
        state = {
            "global_step": trainer.global_step,
            "optimizer_states": [optimizer.state_dict() for optimizer in trainer.optimizers],
            "lr_schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        }
        torch.save(state, self.folder / "start.pt")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after every callback's on_test_start (Lightning runs checkpoint callbacks last)
        torch.save(fingerprint(pl_module.state_dict()), self.folder / "test.pt")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # written aside and renamed: the test polls this file, and a plain write_text has an empty moment
        # (truncated, not yet written) that read as "no progress" and once let a SIGKILL test kill too early
        partial = self.folder / "progress.partial"
        partial.write_text(str(trainer.global_step))
        os.replace(partial, self.folder / "progress")


def fingerprint(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """A digest of each tensor's bytes: equal exactly when the values are bit-identical (NaN included).

    Not a sum: a float sum's rounding depends on the thread count that reduces it, which differs between the
    training subprocess and the test process (the last digit of a 1.2M-element sum did, in CI)."""
    return {
        key: hashlib.sha256(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for key, value in state_dict.items()
    }
