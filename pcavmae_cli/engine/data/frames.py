"""Video frames: JPEG decoding and centre crop (uint8), ImageNet normalisation (float32)."""

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

    ``normalise(decode_crop(...))``: the single-sample path (``dataset`` without ``compact``).
    """
    return normalise(decode_crop(data, cfg, name), cfg)


def decode_crop(data: torch.Tensor, cfg: VideoConfig, name: str) -> torch.Tensor:
    """One JPEG, centre-cropped: ``(3, crop_size, crop_size)`` uint8, not yet normalised.

    Both layouts call this on the same bytes (a frame file, or its copy in a pack), which is
    what makes their frames bit-identical. Preprocessing already resized the shorter side to
    ``short_side``; a frame whose shorter side is below ``crop_size`` (a foreign corpus) is
    resized up first. The crop stays uint8 so that a loader ships a quarter of the float32
    bytes; ``normalise`` converts it where the model runs.

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
    # contiguous(): a copy of the crop (150 kB at 224 px), so a sample held on to does not keep
    # the whole decoded frame alive through a view.
    return TF.center_crop(image, [cfg.crop_size, cfg.crop_size]).contiguous()


def normalise(frames: torch.Tensor, cfg: VideoConfig) -> torch.Tensor:
    """uint8 frames ``(..., 3, S, S)`` -> float32 ``(x / 255 - mean) / std``, a new tensor on their device.

    The one place of this arithmetic: a normalised sample and a compact batch normalised on the
    device (``model_inputs``) go through the same float operations, so they are bit-identical.
    The in-place ``* (1/255) - mean) / std`` gives the same floats as torchvision's
    ``to_dtype(scale=True)`` + ``normalize`` without their temporaries.
    """
    mean, std = _channel_stats(tuple(cfg.mean), tuple(cfg.std), frames.device)
    return frames.to(torch.float32).mul_(1 / 255).sub_(mean).div_(std)


@functools.cache
def _channel_stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, 1, 1)`` float32 tensors of the recipe's per-channel mean and std on ``device``, made
    once per process and device (no copy to the device per batch)."""
    return torch.tensor(mean, device=device).view(-1, 1, 1), torch.tensor(std, device=device).view(-1, 1, 1)
