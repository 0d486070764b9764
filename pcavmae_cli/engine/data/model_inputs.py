"""A loader's batch of compact samples -> the model's inputs, on the device.

Loaders ship samples before normalisation (``AudioVisualDataset(compact=True)``): uint8
frames and the fbank in the store's dtype, a quarter and (from a pack) half of the float32
bytes, so a worker on a small machine spends its time decoding rather than copying. The
normalisation moves here, after the copy to the device, and is done by the functions that
normalise a single sample (``frames.normalise``, ``fbank.normalise``): the same float
operations in the same order, so the inputs are bit-identical to a normalised sample's on the
CPU, and the padded fbank rows are normalised as before.
"""

from __future__ import annotations

import torch

from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data import frames as fr
from pcavmae_cli.engine.schema import DataConfig


def model_inputs(batch: dict[str, torch.Tensor], cfg: DataConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on ``device`` (``non_blocking``: the loader pins memory for
    CUDA), ``frames`` and ``fbank`` normalised as the model reads them.

    Args:
        batch: a collated batch of compact samples: ``frames`` uint8 ``(B, 3, S, S)`` or
            ``(B, K, 3, S, S)``, ``fbank`` ``(B, T, F)`` float16 or float32, not normalised;
            other keys (``index``, ``label``) are only moved.
        cfg: the recipe's ``data`` section (video mean/std, fbank mean/std/std_scale).
    Returns:
        a new dict: ``frames`` and ``fbank`` float32, normalised; ``batch`` is left as it is.
    Raises:
        ValueError: ``frames`` is not uint8, i.e. the batch is already normalised (a dataset
            without ``compact``, or this function applied twice).
    """
    if batch["frames"].dtype != torch.uint8:
        raise ValueError(
            f"model_inputs: frames are {batch['frames'].dtype}, not uint8: the batch is already normalised "
            "(a dataset opened without compact=True, or model_inputs applied twice)"
        )
    moved = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    moved["frames"] = fr.normalise(moved["frames"], cfg.video)
    moved["fbank"] = fb.normalise(moved["fbank"], cfg.audio.fbank)
    return moved
