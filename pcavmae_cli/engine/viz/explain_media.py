"""The clips of an explanation as a person checks them: a picture of their sound, files to play.

For the explained clip and every exemplar the report shows the middle frame next to the
log-Mel spectrogram. The spectrogram is the *un-normalised* log-Mel of the preprocessed WAV
with the recipe's fbank settings, cut to the model's ``target_frames`` (padding is not drawn),
time in seconds, on one colour scale for every clip of the report (``colour_range``), so
loudness and silence compare across clips -- a per-image scale would make silence look busy.

The HTML page plays them. Its files live in ``media/`` next to ``explain.html``:

- the preprocessed WAV of each clip is *copied* there, so a report folder is self-contained:
  zipped and shared, the sound still plays. A clip of the recipe's length (10 s of 16-bit
  16 kHz) is about 320 kB, and a report holds a handful;
- a small picture (frame and log-Mel) of each clip;
- the *source* video (the manifest's ``source``, or the video file given to ``pcav explain``)
  is linked by its path relative to the page, not copied (it can be any size), and only where
  it still exists; elsewhere the frame stands for it.

Files are named by position (``c0`` the clip, ``c1``... the exemplars), never by clip id: ids
come from user data. Every id and label written into the page is escaped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import ClipRecord
from pcavmae_cli.engine.files import atomic_write
from pcavmae_cli.engine.schema import DataConfig, FbankConfig
from pcavmae_cli.engine.viz import draw

MEDIA = "media"  # the folder next to the page
COLOUR_SPREAD = 2.5  # the colour scale spans the corpus mean +- this many standard deviations
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}  # a source shown with <img>
THUMB_SIZE = (3.6, 1.3)  # inches at draw.DPI: 360 x 130 px


@dataclass
class ClipMedia:
    """One clip as the page shows it."""

    clip_id: str
    caption: str  # label and similarity, plain text (escaped when written)
    frame: np.ndarray  # (S, S, 3) middle frame in [0, 1]
    log_mel: np.ndarray  # (F, T) un-normalised
    wav: bytes | None  # the preprocessed WAV; None where the store keeps none (a pack)
    source: str | None  # absolute path of the source video or picture, if it still exists


def display_log_mel(dataset: AudioVisualDataset, index: int) -> np.ndarray:
    """The log-Mel the model reads for clip ``index``, un-normalised and unpadded: ``(F, T)``."""
    raw = dataset.store.log_mel(index, dataset.records[index])
    return raw[: dataset.cfg.audio.fbank.target_frames].float().T.numpy()


def colour_range(fbank: FbankConfig) -> tuple[float, float]:
    """One colour scale for every spectrogram of a report: the recipe's corpus mean +- 2.5 std."""
    return fbank.mean - COLOUR_SPREAD * fbank.std, fbank.mean + COLOUR_SPREAD * fbank.std


def existing_source(record: ClipRecord) -> str | None:
    """The manifest's ``source`` as an absolute path, if the file is still there."""
    if not record.source:
        return None
    path = Path(record.source)
    return str(path.resolve()) if path.is_file() else None


def exemplar_media(dataset: AudioVisualDataset, index: int, caption: str) -> ClipMedia:
    """Clip ``index`` of ``dataset`` (the training manifest, middle frame)."""
    record = dataset.records[index]
    wav = record.audio_path(dataset.root)
    return ClipMedia(
        clip_id=record.id, caption=caption, frame=draw.frame_image(dataset[index]["frames"], dataset.cfg),
        log_mel=display_log_mel(dataset, index), wav=wav.read_bytes() if wav.is_file() else None,
        source=existing_source(record),
    )  # fmt: skip


def clip_picture(clip: ClipMedia, data: DataConfig, vrange: tuple[float, float], path: Path) -> Path:
    """A small PNG of ``clip``: frame, then log-Mel with its time axis."""
    fig = draw.new_figure(*THUMB_SIZE)
    grid = fig.add_gridspec(1, 2, width_ratios=[1, 2.4], left=0.01, right=0.99, top=0.97, bottom=0.2, wspace=0.05)
    draw.show_frame(fig.add_subplot(grid[0]), clip.frame)
    draw.show_log_mel(fig.add_subplot(grid[1]), clip.log_mel, data, vrange)
    return draw.save(fig, path)


def _relative(target: str, folder: Path) -> str:
    """``target`` as a link from a page in ``folder``: relative, or a file URI across drives."""
    try:
        return Path(os.path.relpath(target, folder.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return Path(target).as_uri()


def clip_card(clip: ClipMedia, number: int, folder: Path, data: DataConfig, vrange: tuple[float, float]) -> str:
    """Write ``clip``'s files under ``folder/media`` and return its HTML: picture, caption, players."""
    media = folder / MEDIA
    picture = clip_picture(clip, data, vrange, media / f"c{number}.png")
    name = draw.html_escape(clip.clip_id)
    parts = [f'<img src="{MEDIA}/{picture.name}" alt="frame and log-Mel of {name}">',
             f"<figcaption><b>{name}</b><br>{draw.html_escape(clip.caption)}</figcaption>"]  # fmt: skip
    if clip.wav is not None:
        wav = atomic_write(media / f"c{number}.wav", lambda tmp: Path(tmp).write_bytes(clip.wav))
        parts.append(f'<audio controls preload="none" src="{MEDIA}/{wav.name}"></audio>')
    else:
        parts.append('<span class="note">no WAV kept for this clip</span>')
    if clip.source is not None:
        link = draw.html_escape(_relative(clip.source, folder))
        if Path(clip.source).suffix.lower() in IMAGE_SUFFIXES:
            parts.append(f'<img src="{link}" alt="source picture of {name}">')
        else:
            parts.append(f'<video controls preload="none" src="{link}"></video>')
    return f'<figure class="clip">{"".join(parts)}</figure>'
