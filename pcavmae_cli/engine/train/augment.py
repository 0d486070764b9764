"""Fine-tuning targets, augmentations and loss, on whole batches (docs/method.md ("Downstream")).

Every random draw comes from the global torch RNG of the main process, so the RNG state saved
at an optimiser-step boundary makes a resumed run draw the same masks, partners and mixing
weights. The draws are made on the CPU and copied to the batch's device with
``runtime.host_to_device``, which does not make the host wait for the GPU; nothing here reads a
device value back, so the training step can run ahead of the GPU. Shapes: fbank ``(B, T, F)``,
frames ``(B, 3, S, S)``, targets ``(B, C)`` floats.

Order, as CAV-MAE's data loader: mixup, then SpecAugment, then the fbank noise. CAV-MAE mixes
waveforms before the fbank and masks before normalising; here both act on the normalised fbank
the dataset yields (so a masked value is 0, the corpus mean, rather than CAV-MAE's
``(0 - mean) / (2 std)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.evaluate.metrics import LabelMode
from pcavmae_cli.engine.train.runtime import host_to_device


def one_hot_targets(label: Tensor, label_mode: LabelMode, num_classes: int) -> Tensor:
    """Dataset labels as float ``(B, C)``: multi-hot rows as they are, class indices one-hot.

    A scatter rather than ``F.one_hot``, whose range checks read the labels back on the CPU."""
    if label_mode == "single":
        index = label.long().view(-1, 1)
        return torch.zeros(index.shape[0], num_classes, device=label.device).scatter_(1, index, 1.0)
    return label.float()


def smooth_targets(targets: Tensor, eps: float) -> Tensor:
    """Label smoothing ``y (1 - eps) + eps / C`` (for one-hot rows: torch's ``label_smoothing``)."""
    return targets * (1.0 - eps) + eps / targets.shape[1] if eps else targets


@dataclass
class Mixed:
    """A mixed batch: clip i is ``lam[i]`` x itself + ``1 - lam[i]`` x clip ``partner[i]``."""

    fbank: Tensor
    frames: Tensor
    targets: Tensor
    partner: Tensor  # (B,) long
    lam: Tensor  # (B,) in (0, 1]; 1 for clips that were not mixed


def mixup(fbank: Tensor, frames: Tensor, targets: Tensor, prob: float, alpha: float) -> Mixed:
    """Mix each clip, with probability ``prob``, with another clip of the batch (CAV-MAE's mixup).

    The partners are one permutation of the batch, and the same partner and weight
    ``lam ~ Beta(alpha, alpha)`` mix the audio, the frame *and* the targets of a clip (CAV-MAE
    took the second clip's picture from the first clip's path). Clips not drawn keep lam = 1.
    """
    B = fbank.shape[0]
    dev = fbank.device
    partner = host_to_device(torch.randperm(B), dev)
    draw = host_to_device(torch.rand(B), dev) < prob
    a = torch.tensor(float(alpha))
    # no argument validation: it reads its CPU checks back, and checks.py has refused alpha <= 0
    lam = host_to_device(torch.distributions.Beta(a, a, validate_args=False).sample((B,)), dev)
    lam = torch.where(draw, lam, torch.ones_like(lam))

    def mix(x: Tensor) -> Tensor:
        w = lam.view(B, *([1] * (x.dim() - 1))).to(x.dtype)
        return w * x + (1 - w) * x[partner]

    return Mixed(mix(fbank), mix(frames), mix(targets), partner, lam)


def spec_augment(fbank: Tensor, freq_mask: int, time_mask: int) -> Tensor:
    """One frequency and one time mask per clip, set to 0 (torchaudio's Frequency/TimeMasking).

    A mask of width w ~ U{0, .., width - 1} starts at s ~ U{0, .., size - w}; width 0 disables it.
    """
    B, T, Fq = fbank.shape
    keep = torch.ones(B, T, Fq, dtype=torch.bool)
    for dim, size, width in ((2, Fq, freq_mask), (1, T, time_mask)):
        if width <= 0:
            continue
        w = torch.randint(0, width, (B,))
        start = (torch.rand(B) * (size - w + 1)).long()
        pos = torch.arange(size)
        band = (pos >= start[:, None]) & (pos < (start + w)[:, None])  # (B, size)
        keep &= ~(band[:, None, :] if dim == 2 else band[:, :, None])
    return fbank * host_to_device(keep, fbank.device).to(fbank.dtype)


def fbank_noise(fbank: Tensor) -> Tensor:
    """CAV-MAE's ``noise``: add U(0, 1) noise scaled by U(0, 0.1) per clip, then roll each clip in
    time by U{-10, .., 9} frames."""
    B, T, Fq = fbank.shape
    scale = torch.rand(B, 1, 1) / 10
    noisy = fbank + host_to_device(torch.rand(B, T, Fq) * scale, fbank.device).to(fbank.dtype)
    return roll_in_time(noisy, torch.randint(-10, 10, (B,)))


def roll_in_time(fbank: Tensor, shift: Tensor) -> Tensor:
    """Each clip rolled circularly in time by its own ``shift`` (CPU ``(B,)`` long):
    ``rolled[b, t] = fbank[b, (t - shift[b]) mod T]``."""
    B, T, Fq = fbank.shape
    src = (torch.arange(T)[None, :] - shift[:, None]) % T
    return fbank.gather(1, host_to_device(src, fbank.device)[:, :, None].expand(B, T, Fq))


def pretrain_audio_view(fbank: Tensor, roll: int, freq_mask: int, time_mask: int) -> Tensor:
    """Pre-training's view of a batch's audio (the ``augment`` recipe section): a circular roll
    by U{-roll, .., roll} frames, then SpecAugment. Each draw is a fresh one, so a training
    recording never reaches the model twice in the same form."""
    if roll > 0:
        fbank = roll_in_time(fbank, torch.randint(-roll, roll + 1, (fbank.shape[0],)))
    if freq_mask or time_mask:
        fbank = spec_augment(fbank, freq_mask, time_mask)
    return fbank


def classification_loss(logits: Tensor, targets: Tensor, label_mode: LabelMode) -> Tensor:
    """BCE with logits averaged over clips and classes (``multi_hot``), or soft-target
    cross-entropy averaged over clips (``single``); in fp32."""
    logits = logits.float()
    if label_mode == "single":
        return F.cross_entropy(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets)
