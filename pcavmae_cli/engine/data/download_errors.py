"""What a failed clip means: a short reason code, whether to retry it, and what setup it points at.

yt-dlp and ffmpeg say why a fetch failed in English sentences that change with their
releases; the downloader needs three facts from them:

* a **reason code** for failures.jsonl (``private``, ``http_404``, ``rate_limited``, ...);
* whether another try can help: **permanent** reasons (the video is gone) are not retried by
  a rerun, **throttled** ones (429, 5xx, time-outs) are retried at once with backoff and count
  towards the circuit breaker (``pacing.py``), everything else waits for the next run;
* whether the failure is about the **setup** rather than the video: when every clip of a run
  fails the same way because YouTube wants cookies, or yt-dlp lacks a JavaScript runtime, or
  the proxy is down, a user should read that once, in words, with the fix (``SetupWatch``).
"""

from __future__ import annotations

import re
import threading

# Reasons that another try will not change; the others are retried by every rerun (with
# ``retry_failed`` everything is). A rate limit is never one of these.
PERMANENT_REASONS = frozenset(
    {"invalid_id", "invalid_segment", "http_404", "http_410", "private", "unavailable",
     "age_restricted", "geo_blocked", "too_short", "no_video_stream", "no_audio_stream", "zero_duration",
     "undecodable"}
)

RATE_LIMITED = "rate_limited"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_HTTP = re.compile(r"(?:HTTP Error|Server returned) (\d{3})")
_FFMPEG_5XX = "5XX Server Error"  # ffmpeg's words for a 5xx it has no name for
# Lower-case fragments of yt-dlp / YouTube / ffmpeg messages, first match wins.
_MESSAGES = (
    ("private video", "private"),
    ("confirm your age", "age_restricted"),
    ("age-restricted", "age_restricted"),
    ("not a bot", "sign_in_required"),
    ("sign in to confirm", "sign_in_required"),
    ("use --cookies", "sign_in_required"),
    ("rate-limited", RATE_LIMITED),
    ("try again later", RATE_LIMITED),
    ("rate limited", RATE_LIMITED),
    ("too many requests", RATE_LIMITED),
    ("javascript runtime", "js_runtime_missing"),
    ("n challenge", "js_runtime_missing"),
    ("nsig extraction failed", "js_runtime_missing"),
    ("signature solving failed", "js_runtime_missing"),
    ("only images are available", "js_runtime_missing"),
    ("unable to connect to proxy", "proxy_error"),
    ("proxyerror", "proxy_error"),
    ("tunnel connection failed", "proxy_error"),
    ("not available in your country", "geo_blocked"),
    ("video unavailable", "unavailable"),
    ("video is unavailable", "unavailable"),
    ("has been removed", "unavailable"),
    ("no longer available", "unavailable"),
    ("account associated with this video has been terminated", "unavailable"),
    ("copyright", "unavailable"),
    ("requested format is not available", "no_format"),
    ("timed out", "timeout"),
    ("connection timed out", "timeout"),
    ("name or service not known", "no_network"),
    ("temporary failure in name resolution", "no_network"),
    ("failed to resolve", "no_network"),
    ("network is unreachable", "no_network"),
    ("connection refused", "connection_refused"),
)


def classify_error(message: str, status: int | None = None) -> str:
    """Short reason code for a yt-dlp or ffmpeg error: ``http_404``, ``private``, ``rate_limited``, ...

    ``download_failed`` when nothing more specific is known; it is treated as transient.
    A 429 is ``rate_limited`` whichever way it is told.
    """
    if status is None:
        m = _HTTP.search(message)
        status = int(m.group(1)) if m else None
    if status is None and _FFMPEG_5XX in message:
        status = 500
    if status == 429:
        return RATE_LIMITED
    text = message.lower()
    for fragment, reason in _MESSAGES:
        if fragment in text:
            return reason
    return f"http_{status}" if status else "download_failed"


def is_throttled(reason: str) -> bool:
    """A reason to retry at once after a backoff, and that counts towards the circuit breaker."""
    return reason in (RATE_LIMITED, "timeout") or bool(re.fullmatch(r"http_5\d\d", reason))


def is_permanent(reason: str) -> bool:
    return reason in PERMANENT_REASONS


def clean(message: str) -> str:
    """A yt-dlp message without its colours and ``ERROR:`` prefix."""
    return _ANSI.sub("", message).removeprefix("ERROR: ").strip()


# What to tell a user whose every clip fails for one of these reasons.
SETUP_HINTS = {
    "sign_in_required": (
        "YouTube asks to sign in to confirm you are not a bot: pass cookies of a logged-in browser "
        "with --cookies-from-browser firefox (or chrome, ...) or --cookies cookies.txt"
    ),
    "js_runtime_missing": (
        "yt-dlp needs a JavaScript runtime (deno) and its challenge solver for YouTube's formats: "
        "pip install 'pcavmae-cli[download]'"
    ),
    "no_format": (
        "no format of the videos could be fetched; with YouTube this is how a missing JavaScript "
        "runtime shows: pip install 'pcavmae-cli[download]'"
    ),
    "proxy_error": "the proxy does not answer: check --proxy (scheme, host and port)",
    "no_network": "the site's name does not resolve: no network, or set --proxy",
    "connection_refused": "connections are refused: check the network, --proxy or --url-template",
    RATE_LIMITED: (
        "the site is rate-limiting this address: lower --jobs, set --max-rate (e.g. 30 clips per minute), "
        "pass --cookies, or wait an hour; rate-limited clips are retried by every rerun"
    ),
    "http_403": (
        "the site refuses the requests (HTTP 403): update yt-dlp (pip install -U yt-dlp), and pass "
        "cookies (--cookies-from-browser) if it persists"
    ),
}


class SetupWatch:
    """Says once what the setup lacks when the first ``first`` clips of a run all fail alike.

    Fed every settled clip (``None`` for a success). A success among the first ones means the
    setup works and the watch goes quiet for good; ``message`` returns the hint once, for the
    clip that makes the count, and None ever after.
    """

    def __init__(self, first: int = 5):
        self.first = first
        self._reasons: list[str] = []
        self._done = False
        self._lock = threading.Lock()

    def message(self, reason: str | None) -> str | None:
        with self._lock:
            if self._done:
                return None
            if reason is None:
                self._done = True
                return None
            self._reasons.append(reason)
            if len(self._reasons) < self.first:
                return None
            self._done = True
            if len(set(self._reasons)) != 1 or reason not in SETUP_HINTS:
                return None
            return f"the first {len(self._reasons)} clips all failed with {reason}: {SETUP_HINTS[reason]}"
