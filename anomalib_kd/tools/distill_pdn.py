"""Distil a PDN-medium teacher (EfficientAD / DHKD) from a timm backbone over a folder of images.

EfficientAD's pretraining recipe (the DHKD teacher comes from it): a frozen ImageNet backbone
(WideResNet-101, layers 2 and 3, at 512 px) gives PatchCore-style patch features, locally averaged over
3x3 neighbourhoods, pooled across channels to ``out_channels`` (384) and standardised per channel; the
padded medium PDN, fed the same image at 256 px, regresses them (MSE) with Adam (1e-4, weight decay 1e-5).
The backbone's target map (64x64 at 512 px for stride-8 ``layer2``) is resized to the PDN's output size.

Output: a state dict in anomalib's PDN layout (``conv1..conv6``), loadable as the DHKD teacher
(``DHKD(weights_path=...)``) or by anomalib's EfficientAd. Training is resumable: every
``checkpoint_every`` steps a checkpoint ``<output>.ckpt`` is written to a temporary file and renamed over
the previous one, so an interrupted run never leaves a partial checkpoint; a rerun with the same output
resumes from it. The backbone's weights come from a local file, else timm's download (see
:func:`anomalib_kd.components.backbones.load_pretrained_backbone`; ``ANOMALIB_KD_OFFLINE=1`` forbids it).

Example:
    python -m anomalib_kd.tools.distill_pdn --images /data/imagenet/train --output pdn_medium.pth \\
        --backbone wide_resnet101_2.tv_in1k --weights wide_resnet101_2-32ee1156.pth --steps 60000
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from anomalib_kd.components.backbones import create_feature_extractor, load_pretrained_backbone
from anomalib_kd.data.image import image_files, read_image
from anomalib_kd.models.dhkd.teacher import build_teacher

logger = logging.getLogger(__name__)

__all__ = ["PatchFeatureTarget", "distill_pdn", "main"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ImageFolder(Dataset):
    """All images under ``root`` (recursive), as ``(backbone_view, pdn_view)`` in [0, 1]."""

    def __init__(self, root: Path, backbone_size: int, pdn_size: int, grayscale_p: float) -> None:
        self.files = image_files(root)  # raises, naming root, when it holds no image
        self.augment = v2.RandomGrayscale(grayscale_p)
        self.backbone_size = backbone_size
        self.pdn_size = pdn_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = self.augment(read_image(self.files[index]))
        big = v2.functional.resize(tensor, [self.backbone_size] * 2, antialias=True)
        small = v2.functional.resize(tensor, [self.pdn_size] * 2, antialias=True)
        return big, small


class PatchFeatureTarget(nn.Module):
    """Frozen backbone features as distillation targets (PatchCore-style aggregation).

    Each layer: 3x3 local average (stride 1), resized to the first layer's size, pooled across channels to
    ``embed_dim``; the layers are concatenated and pooled across channels to ``out_channels``.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet101_2.tv_in1k",
        layers: Sequence[str] = ("layer2", "layer3"),
        out_channels: int = 384,
        embed_dim: int = 1024,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.extractor = create_feature_extractor(backbone, list(layers), requires_grad=False).eval()
        self.layers = list(layers)
        self.out_channels = out_channels
        self.embed_dim = embed_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @staticmethod
    def _pool_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
        batch, _, height, width = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(batch * height * width, 1, -1)
        pooled = F.adaptive_avg_pool1d(flat, channels)
        return pooled.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        features = self.extractor((images - self.mean) / self.std)
        maps = [features[name] for name in self.layers]
        size = maps[0].shape[-2:]
        pooled = []
        for feature in maps:
            feature = F.avg_pool2d(feature, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if feature.shape[-2:] != size:
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            pooled.append(self._pool_channels(feature, self.embed_dim))
        target = self._pool_channels(torch.cat(pooled, dim=1), self.out_channels)
        if target.shape[-2:] != tuple(output_size):
            target = F.interpolate(target, size=output_size, mode="bilinear", align_corners=False)
        return target


def _atomic_save(obj: object, path: Path) -> None:
    """Write to ``path`` through a temporary file and a rename: ``path`` is never partial."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cycle(loader: DataLoader) -> Iterator:
    """Batches of ``loader`` without end."""
    while True:
        yield from loader


def distill_pdn(
    images: str | Path,
    output: str | Path = "pdn_medium.pth",
    backbone: str = "wide_resnet101_2.tv_in1k",
    layers: Sequence[str] = ("layer2", "layer3"),
    weights_path: str | Path | None = None,
    pre_trained: bool = True,
    steps: int = 60000,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    image_size: int = 256,
    backbone_image_size: int = 512,
    out_channels: int = 384,
    stats_images: int = 200,
    grayscale_p: float = 0.1,
    checkpoint_every: int = 1000,
    resume: bool = True,
    num_workers: int = 4,
    device: str = "auto",
    seed: int = 42,
    progress: bool = True,
) -> Path:
    """Distil a padded PDN-medium from ``backbone`` over the images under ``images``; returns ``output``.

    Args:
        images: folder of training images (searched recursively), e.g. ImageNet's ``train``.
        output: final teacher state dict (anomalib layout). The resumable checkpoint is ``<output>.ckpt``.
        backbone: timm name of the feature backbone (paper: WideResNet-101).
        layers: backbone layers aggregated into the target.
        weights_path: local ImageNet weights of the backbone (else ``$ANOMALIB_KD_WEIGHTS`` / timm's cache).
        pre_trained: load those weights; ``False`` keeps a random backbone (tests only).
        steps: optimisation steps (EfficientAD: 60000 at batch 16).
        batch_size, lr, weight_decay: Adam settings.
        image_size: PDN input size (256 gives 64x64 outputs).
        backbone_image_size: backbone input size (512 gives 64x64 ``layer2`` maps).
        out_channels: teacher channels (384).
        stats_images: images used for the target's per-channel mean/std.
        grayscale_p: probability of the random-grayscale augmentation.
        checkpoint_every: steps between resumable checkpoints (written atomically).
        resume: continue from ``<output>.ckpt`` when it exists.
        num_workers: data-loading workers.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: random seed.
        progress: show progress bars.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_path = output.with_name(output.name + ".ckpt")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    torch.manual_seed(seed)
    random.seed(seed)

    target_net = PatchFeatureTarget(backbone, layers, out_channels)
    if pre_trained:
        load_pretrained_backbone(target_net.extractor, backbone, weights_path)
    target_net = target_net.to(device).eval()
    pdn = build_teacher(out_channels).to(device)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=weight_decay)

    dataset = _ImageFolder(Path(images), backbone_image_size, image_size, grayscale_p)
    loader = DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        shuffle=True,
        num_workers=num_workers,
        drop_last=len(dataset) >= batch_size,
    )
    with torch.no_grad():
        output_size = tuple(pdn(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-2:])

    step = 0
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        pdn.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        mean, std = state["stats"]["mean"].to(device), state["stats"]["std"].to(device)
        step = int(state["step"])
        logger.info("Resuming PDN distillation from %s at step %d", checkpoint_path, step)
    else:
        mean, std = _target_stats(target_net, dataset, stats_images, output_size, device, progress)

    def save_checkpoint() -> None:
        _atomic_save(
            {
                "teacher": pdn.state_dict(),
                "optimizer": optimizer.state_dict(),
                "stats": {"mean": mean.cpu(), "std": std.cpu()},
                "step": step,
                "config": {
                    "backbone": backbone,
                    "layers": list(layers),
                    "steps": steps,
                    "image_size": image_size,
                },
            },
            checkpoint_path,
        )

    batches = _cycle(loader)
    pdn.train()
    bar = tqdm(total=steps, initial=step, desc="Distilling PDN", disable=not progress)
    loss_value = float("nan")
    while step < steps:
        big, small = next(batches)
        target = (target_net(big.to(device), output_size) - mean) / std
        loss = F.mse_loss(pdn(small.to(device)), target)
        if not torch.isfinite(loss):
            msg = (
                f"PDN distillation loss became {loss.item()} at step {step}; {checkpoint_path} is untouched."
            )
            raise FloatingPointError(msg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % checkpoint_every == 0 or step == steps:
            save_checkpoint()
    bar.close()
    if step == 0 or not checkpoint_path.is_file():
        save_checkpoint()
    _atomic_save({k: v.detach().cpu() for k, v in pdn.state_dict().items()}, output)
    logger.info("PDN teacher written to %s (final loss %.4f)", output, loss_value)
    return output


@torch.no_grad()
def _target_stats(
    target_net: PatchFeatureTarget,
    dataset: _ImageFolder,
    count: int,
    output_size: tuple[int, int],
    device: str,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the targets over the first ``count`` images (float64 sums)."""
    total = 0
    sum_ = sum_sq = None
    indices = range(min(count, len(dataset)))
    for index in tqdm(indices, desc="Target channel mean & std", disable=not progress):
        target = target_net(dataset[index][0][None].to(device), output_size).double()
        if sum_ is None:
            sum_ = torch.zeros(target.shape[1], dtype=torch.float64, device=target.device)
            sum_sq = torch.zeros_like(sum_)
        total += target[:, 0].numel()
        sum_ += target.sum(dim=(0, 2, 3))
        sum_sq += (target**2).sum(dim=(0, 2, 3))
    mean = sum_ / total
    std = (sum_sq / total - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m anomalib_kd.tools.distill_pdn --images DIR --output FILE [...]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of training images (recursive)")
    parser.add_argument("--output", default="pdn_medium.pth", help="teacher file to write (anomalib layout)")
    parser.add_argument("--backbone", default="wide_resnet101_2.tv_in1k", help="timm backbone name")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3"], help="backbone layers")
    parser.add_argument("--weights", default=None, help="backbone weights file (else caches, timm download)")
    parser.add_argument("--no-pretrained", action="store_true", help="random backbone (testing only)")
    parser.add_argument("--steps", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--image-size", type=int, default=256, help="PDN input size")
    parser.add_argument("--backbone-image-size", type=int, default=512, help="backbone input size")
    parser.add_argument("--out-channels", type=int, default=384)
    parser.add_argument("--stats-images", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing <output>.ckpt")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    return distill_pdn(
        images=args.images,
        output=args.output,
        backbone=args.backbone,
        layers=args.layers,
        weights_path=args.weights,
        pre_trained=not args.no_pretrained,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        image_size=args.image_size,
        backbone_image_size=args.backbone_image_size,
        out_channels=args.out_channels,
        stats_images=args.stats_images,
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
        num_workers=args.num_workers,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    main()
