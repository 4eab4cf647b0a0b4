"""Distributed (DDP) settings a model needs, applied from its ``setup`` hook so that the user's
``--trainer.strategy ddp`` works unchanged."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from lightning.pytorch import Trainer
from torch import distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def detect_unused_parameters(trainer: Trainer, model_name: str, reason: str) -> None:
    """Turn on DDP's ``find_unused_parameters`` before the model is wrapped (Lightning wraps it after the
    ``setup`` hook).

    Needed by models that step several optimisers with separate backward passes (manual optimisation):
    each pass reaches only its own sub-network, and DDP without unused-parameter detection stops at the
    first step. No effect outside DDP (Lightning's DDP and DDP-spawn strategies keep the arguments of
    ``DistributedDataParallel`` in ``_ddp_kwargs``).
    """
    ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
    if not isinstance(ddp_kwargs, dict) or ddp_kwargs.get("find_unused_parameters"):
        return
    ddp_kwargs["find_unused_parameters"] = True
    logger.info("%s under DDP: find_unused_parameters=True (%s).", model_name, reason)


def average_batch_norm_statistics(module: nn.Module) -> None:
    """Average the BatchNorm running statistics of ``module`` over the DDP ranks (one all-reduce).

    Without it each rank keeps the running mean/variance of its own shard (DDP re-broadcasts rank 0's at
    the next forward), so validation on different ranks would score with different models and the saved
    checkpoint would hold rank 0's shard statistics. After each step, the average over ranks of the
    updated statistics is the momentum update with the mean over all ranks' batches (the running mean
    then equals a single process's over the combined batch; the running variance leaves out the spread
    between the ranks' batch means). ``--trainer.sync_batchnorm true`` (GPUs: PyTorch's
    ``SyncBatchNorm`` is GPU-only) also synchronises the batch statistics used in the forward pass.
    No effect in a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    buffers = [
        buffer
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
        for buffer in (layer.running_mean, layer.running_var)
        if buffer is not None
    ]
    if not buffers:
        return
    flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for buffer, averaged in zip(buffers, torch.split(flat, [b.numel() for b in buffers]), strict=True):
        buffer.copy_(averaged.view_as(buffer))


def distinct_random_streams(trainer: Trainer) -> None:
    """Give each DDP rank its own random stream: seed ``initial seed + global rank`` (torch, NumPy, random).

    ``seed_everything`` seeds every rank alike, so without this each rank would draw the same synthetic
    anomalies (URD), dropout masks and episode augmentations in its training steps, on different images.
    Called after the weights are initialised (identical on all ranks; DDP broadcasts rank 0's anyway).
    No effect in a single process; the same seed and world size give the same runs.
    """
    if trainer.world_size < 2:
        return
    seed = (torch.initial_seed() + trainer.global_rank) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
