"""Video frames: JPEG decoding, centre crop and ImageNet normalisation."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.schema import VideoConfig


def load_frame(path: Path, cfg: VideoConfig) -> torch.Tensor:
    """One frame file as the visual encoder sees it: ``(3, crop_size, crop_size)``, see ``decode_frame``."""
    try:
        data = read_file(str(path))
    except RuntimeError:
        raise UserError(f"frame not found: {path}") from None
    return decode_frame(data, cfg, str(path))


def decode_frame(data: torch.Tensor, cfg: VideoConfig, name: str) -> torch.Tensor:
    """One JPEG as the visual encoder sees it: ``(3, crop_size, crop_size)`` float32, normalised.

    Both layouts call this on the same bytes (a frame file, or its copy in a pack), which is
    what makes their frames bit-identical. Preprocessing already resized the shorter side to
    ``short_side``; a frame whose shorter side is below ``crop_size`` (a foreign corpus) is
    resized up first. The crop comes before the conversion to float, so only the crop is
    converted; the in-place ``* (1/255) - mean) / std`` gives the same floats as torchvision's
    ``to_dtype(scale=True)`` + ``normalize`` without their temporaries.

    Args:
        data: ``(bytes,)`` uint8, the JPEG file's content.
        name: what an error names (the file, or the clip and frame of a pack).
    """
    try:
        image = decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise UserError(f"{name}: cannot decode JPEG ({exc})") from None
    if min(image.shape[-2:]) < cfg.crop_size:
        image = TF.resize(image, cfg.crop_size, antialias=True)
    image = TF.center_crop(image, [cfg.crop_size, cfg.crop_size])
    mean, std = _channel_stats(tuple(cfg.mean), tuple(cfg.std))
    return image.to(torch.float32).mul_(1 / 255).sub_(mean).div_(std)


@functools.cache
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, 1, 1)`` tensors of the recipe's per-channel mean and std, made once per process."""
    return torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
