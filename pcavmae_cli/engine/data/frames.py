"""Video frames: JPEG decoding, centre crop and ImageNet normalisation."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.schema import VideoConfig


def load_frame(path: Path, cfg: VideoConfig) -> torch.Tensor:
    """One frame as the visual encoder sees it: ``(3, crop_size, crop_size)`` float32, normalised.

    Preprocessing already resized the shorter side to ``short_side``; a frame whose shorter
    side is below ``crop_size`` (a foreign corpus) is resized up first.
    """
    try:
        image = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        if not path.is_file():
            raise UserError(f"frame not found: {path}") from None
        raise UserError(f"{path}: cannot decode JPEG ({exc})") from None
    if min(image.shape[-2:]) < cfg.crop_size:
        image = TF.resize(image, cfg.crop_size, antialias=True)
    image = TF.center_crop(image, [cfg.crop_size, cfg.crop_size])
    image = TF.to_dtype(image, torch.float32, scale=True)
    return TF.normalize(image, cfg.mean, cfg.std)
