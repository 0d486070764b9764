"""Is a decision audio- or video-driven? One measure, the *audio share*, in [0, 1].

A two-part quantity ``Delta = audio + video`` (exactly) is split between the modalities, and

    audio share = |audio| / (|audio| + |video|)

(``None`` when both parts are 0: nothing to split). It is the fraction of the decision's
movement that the sound carries, whichever way each part pushes. ``verdict`` turns it into the
sentence of the reports: mostly audio-driven at >= 2/3, mostly video-driven at <= 1/3, else
both. Two decisions are measured (docs/method.md, "Figures and explanations"):

- **a fine-tuned model's top logit** (``logit_share``): the two-player Shapley split of
  ``l(a, v) - l(a0, v0)``, with ``a0``/``v0`` neutral inputs -- the all-zero normalised fbank and
  frame, i.e. a flat spectrogram at the corpus's mean level and a frame of the mean colour::

      audio = ( [l(a, v0) - l(a0, v0)] + [l(a, v) - l(a0, v)] ) / 2
      video = ( [l(a0, v) - l(a0, v0)] + [l(a, v) - l(a, v0)] ) / 2

  the effect of putting the sound in, averaged over the picture being absent or present (and
  likewise for the picture); the two add up to the change exactly. The logit is frame-averaged,
  as ``pcav evaluate`` averages. It needs no model internals: any head, any ``mode`` (an
  audio-only head gets share 1 because its logit never sees the frames).
- **the nearest prototype** (``prototype_share``), for any run, pre-training included: what
  separates the clip's nearest prototype p1 from the runner-up p2. With unit ẑ_a, ẑ_v and
  n = |ẑ_a + ẑ_v|, the joint embedding is (ẑ_a + ẑ_v) / n (``joint_embedding``), so the margin

      cos(joint, p1) - cos(joint, p2) = ẑ_a . (p1 - p2) / n  +  ẑ_v . (p1 - p2) / n
                                        audio part               video part

  A collapsed audio side (ẑ_a about equally near every prototype) gives a share near 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MOSTLY = 2 / 3  # a share at least this far to one side is "mostly" that modality


@dataclass
class ModalityShare:
    """``total = audio + video`` and the audio share of it (module docstring)."""

    what: str  # the decision split, in words
    audio: float
    video: float
    total: float  # the change or margin split: audio + video
    share: float | None  # |audio| / (|audio| + |video|); None when both are 0
    verdict: str  # "mostly audio-driven", "mostly video-driven", "both" or "undecided"


def audio_share(audio: float, video: float) -> float | None:
    """|audio| / (|audio| + |video|), ``None`` when both are 0."""
    size = abs(audio) + abs(video)
    return abs(audio) / size if size > 0 else None


def verdict(share: float | None) -> str:
    """The report's words for an audio share."""
    if share is None:
        return "undecided"
    if share >= MOSTLY:
        return "mostly audio-driven"
    if share <= 1 - MOSTLY:
        return "mostly video-driven"
    return "both"


def sentence(s: ModalityShare, subject: str = "the decision") -> str:
    """e.g. 'the decision is mostly audio-driven (audio share 0.83 of the top logit's change from a
    neutral input: audio +1.200, video -0.250)'."""
    share = "-" if s.share is None else f"{s.share:.2f}"
    words = "driven by both audio and video" if s.verdict == "both" else s.verdict
    return f"{subject} is {words} (audio share {share} of {s.what}: audio {s.audio:+.3f}, video {s.video:+.3f})"


def make_share(what: str, audio: float, video: float) -> ModalityShare:
    share = audio_share(audio, video)
    return ModalityShare(what, float(audio), float(video), float(audio + video), share, verdict(share))


@torch.no_grad()
def logit_share(model: torch.nn.Module, fbank: Tensor, frames: Tensor, cls: int) -> ModalityShare:
    """Shapley split of the top logit between audio and video (module docstring).

    Args:
        model: a ``Classifier`` (anything with ``frame_logits(fbank, frames) -> (B, K, C)``).
        fbank: ``(T, F)`` the clip's normalised fbank; ``frames``: ``(K, 3, S, S)`` normalised.
        cls: the class whose logit is split (the predicted one).
    """
    a0, v0 = torch.zeros_like(fbank), torch.zeros_like(frames)
    fbanks = torch.stack([fbank, a0, fbank, a0])  # (a, v), (a0, v), (a, v0), (a0, v0)
    videos = torch.stack([frames, frames, v0, v0])
    logits = model.frame_logits(fbanks, videos)[..., cls].float().mean(dim=1).double().cpu()  # (4,)
    both, video_only, audio_only, neither = logits.tolist()
    audio = ((audio_only - neither) + (both - video_only)) / 2
    video = ((video_only - neither) + (both - audio_only)) / 2
    return make_share("the top logit's change from a neutral input", audio, video)


def prototype_share(z_a: Tensor, z_v: Tensor, centroids: Tensor) -> ModalityShare | None:
    """Split of the margin between the nearest and the second-nearest joint prototype.

    Args:
        z_a, z_v: ``(D,)`` the clip's audio and video embeddings (normalised here).
        centroids: ``(K, D)`` unit joint prototypes p^m. ``None`` with fewer than two prototypes.
    """
    if centroids.shape[0] < 2:
        return None
    a, v = F.normalize(z_a.double(), dim=0), F.normalize(z_v.double(), dim=0)
    p = centroids.double()
    n = float((a + v).norm())
    if n == 0:  # opposite embeddings: no joint direction, nothing decides
        return make_share("the nearest prototype", 0.0, 0.0)
    first, second = ((a + v) @ p.T).topk(2).indices.tolist()
    gap = p[first] - p[second]
    return make_share(f"the margin of P{first} over P{second}", float(a @ gap / n), float(v @ gap / n))
