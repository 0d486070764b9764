"""Is a decoded clip whole? The checks between ffmpeg's extraction pass and the manifest.

A damaged file decodes "successfully": where a decoder meets garbage it conceals or drops it,
logs an error and exits 0, so a clip with a corrupt middle arrives with seconds of audio missing
and the rest shifted against the picture. Two signs give it away, and both are checked here:
the error lines ffmpeg logged, and decoded lengths that disagree with the streams' packets
(``media.probe``). Also here: a file cut off inside the clip window (a partial download) and a
stream whose packets stop far before the other's.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pcavmae_cli.engine import media

if TYPE_CHECKING:  # preprocess imports this module
    from pcavmae_cli.engine.data.preprocess import ClipSettings


def ffmpeg_message(line: str) -> str:
    """An ffmpeg log line without object addresses (``[aac @ 0x55d0...]``): stable and readable."""
    return re.sub(r" @ 0x[0-9a-f]+", "", line).strip()


# Decoded audio may differ from its packets' span by the encoder delay and padding the
# container does not trim (a few ms, at most a codec frame); a dropped packet costs 20-70 ms.
# 0.1 s passes every container of scripts/real_media_formats.py and catches a second lost.
AUDIO_TOLERANCE_S = 0.1


# What decoders log when a seek lands on a keyframe whose neighbours reference frames before it
# (open GOPs): those frames fall before the clip window and are dropped; nothing in it is lost.
_SEEK_NOISE = re.compile(
    r"mmco: unref short failure|co located POCs unavailable|[Mm]issing reference picture"
    r"|reference picture missing during reorder|Could not find ref with POC|Error constructing the frame RPS"
)
_REPEATED = re.compile(r"Last message repeated (\d+) times?")


def decode_errors(lines: list[str], seeking: bool) -> list[str]:
    """The error lines that mean damage: repeats expanded, a seek's reference warnings dropped."""
    errors: list[str] = []
    last_kept = False
    for line in lines:
        repeated = _REPEATED.search(line)
        if repeated:
            if last_kept:
                errors.extend([errors[-1]] * int(repeated.group(1)))
            continue
        last_kept = not (seeking and _SEEK_NOISE.search(line))
        if last_kept:
            errors.append(line)
    return errors


def _span_in(begin: float | None, end: float | None, window_start: float, window_end: float) -> float | None:
    """Seconds of the stream ``[begin, end]`` inside the clip window; None when unknown."""
    if end is None:
        return None
    return max(0.0, min(end, window_end) - max(begin or 0.0, window_start))


def decode_issues(
    info: media.MediaInfo, start: float, settings: ClipSettings, errors: list[str], n_samples: int, n_frames: int
) -> tuple[str, str] | None:
    """``(reason, detail)`` when the clip window decoded with errors or to the wrong length.

    ``errors`` are the lines ``preprocess._run_ffmpeg`` returned. The lengths expected are those of the
    streams' packets in the window (``media.probe``), so a decoder that drops what it cannot
    read shows as missing audio; frames are resampled to ``fps`` (a lost frame is replaced by
    its neighbour), so only frames missing at the end show, and one frame of rounding is
    allowed.
    """
    issues = []
    errors = decode_errors(errors, seeking=start > 0)
    if errors:
        issues.append(f"{len(errors)} decode error(s), first: {ffmpeg_message(errors[0])}")
    window_end = start + settings.clip_seconds
    audio = _span_in(info.audio_start, info.audio_end, start, window_end)
    audio_s = n_samples / settings.sample_rate
    if audio is not None and abs(audio_s - audio) > AUDIO_TOLERANCE_S:
        issues.append(f"decoded {audio_s:.2f} s of audio where its packets hold {audio:.2f} s")
    video = _span_in(info.video_start, info.video_end, start, window_end)
    if video is not None:
        wanted = min(settings.n_frames, round(video * settings.fps))
        if n_frames < wanted - 1:
            issues.append(f"decoded {n_frames} frames where its packets hold {video:.2f} s ({wanted} frames)")
    if not issues:
        return None
    return ("decode_errors" if errors else "length_mismatch"), "; ".join(issues)


def cut_short(info: media.MediaInfo, start: float, settings: ClipSettings) -> str | None:
    """A detail when ffmpeg found the file cut off inside the clip window (a partial download)."""
    cut = [e for e in info.read_errors if e.endswith("partial file")]
    if not cut or (info.duration or 0.0) >= start + settings.clip_seconds:
        return None
    return f"readable packets stop at {info.duration or 0.0:.2f} s ({ffmpeg_message(cut[0])}): the file is incomplete"


def stream_stops_early(info: media.MediaInfo, start: float, settings: ClipSettings) -> str | None:
    """A detail when the audio or video packets stop far (over max(1 s, 20 %)) before the other
    stream's inside the clip window, as where a download or a remux lost a stream's tail."""
    window_end = start + settings.clip_seconds
    spans = {
        "audio": _span_in(info.audio_start, info.audio_end, start, window_end),
        "video": _span_in(info.video_start, info.video_end, start, window_end),
    }
    known = {kind: span for kind, span in spans.items() if span is not None}
    if len(known) < 2:
        return None
    longest = max(known.values())
    for kind, span in known.items():
        if longest - span > max(1.0, 0.2 * longest):
            return f"the {kind} packets hold {span:.1f} s of the clip, the other stream's {longest:.1f} s"
    return None
