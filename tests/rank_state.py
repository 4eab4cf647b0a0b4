"""A callback the distributed tests add to the stock ``anomalib train`` command
(``--trainer.callbacks+=tests.rank_state.RankStateDump``): each rank writes what it holds when training
ends, so the test can compare the ranks with each other and with a single-process computation."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class RankStateDump(Callback):
    """Write ``rank<global rank>.pt``: the module's state dict, optimiser states and learning rates, global
    step, world size, random seed."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {name: value.detach().cpu().clone() for name, value in pl_module.state_dict().items()}
        record = {
            "state": state,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "initial_seed": torch.initial_seed(),
            "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
            "learning_rates": [group["lr"] for opt in trainer.optimizers for group in opt.param_groups],
        }
        torch.save(record, self.dirpath / f"rank{trainer.global_rank}.pt")
