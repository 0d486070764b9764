"""What a download needs to get past today's YouTube: cookies, a proxy, a JavaScript runtime.

Checked once, before the first clip, so that a mistake is one line naming the option instead of
two million identical failures:

* ``--cookies FILE`` (Netscape cookies.txt) and ``--cookies-from-browser BROWSER[+KEYRING]
  [:PROFILE][::CONTAINER]`` are read once into a private copy in the run's work folder
  (owner-only, removed with it); every clip reads that copy, the user's file is never written
  (yt-dlp would write its jar back into it), and the browser's database is opened once, not per
  clip;
* ``--proxy URL``: a scheme yt-dlp knows (http, https, socks4, socks4a, socks5, socks5h);
* YouTube's formats need their "n" challenge solved in JavaScript: yt-dlp runs its solver
  (the ``yt-dlp-ejs`` package) in deno, both installed by the ``download`` extra.
  ``js_runtimes`` finds one so that the run can warn before it starts instead of failing every clip.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pcavmae_cli.engine.errors import UserError

PROXY_SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")
# yt-dlp's --cookies-from-browser syntax: BROWSER[+KEYRING][:PROFILE][::CONTAINER]
_BROWSER_SPEC = re.compile(r"(?P<name>[^+:]+)(?:\s*\+\s*(?P<keyring>[^:]+))?(?:\s*:(?!:)\s*(?P<profile>.+?))?"
                           r"(?:\s*::\s*(?P<container>.+))?$")


def check_proxy(proxy: str | None) -> None:
    if proxy is None:
        return
    scheme, sep, rest = proxy.partition("://")
    if not sep or scheme.lower() not in PROXY_SCHEMES or not rest.strip("/"):
        raise UserError(f"--proxy {proxy!r}: expected SCHEME://HOST:PORT with a scheme among {', '.join(PROXY_SCHEMES)}")


def parse_browser(spec: str) -> tuple[str, str | None, str | None, str | None]:
    """(browser, profile, keyring, container) as yt-dlp's ``cookiesfrombrowser`` takes them."""
    from yt_dlp.cookies import SUPPORTED_BROWSERS, SUPPORTED_KEYRINGS

    m = _BROWSER_SPEC.match(spec.strip())
    name = m.group("name").strip().lower() if m else ""
    if not m or name not in SUPPORTED_BROWSERS:
        raise UserError(f"--cookies-from-browser {spec!r}: the browser must be one of {', '.join(sorted(SUPPORTED_BROWSERS))}")
    keyring = m.group("keyring").strip().upper() if m.group("keyring") else None
    if keyring is not None and keyring not in SUPPORTED_KEYRINGS:
        raise UserError(f"--cookies-from-browser {spec!r}: the keyring must be one of {', '.join(sorted(SUPPORTED_KEYRINGS))}")
    return name, m.group("profile"), keyring, m.group("container")


def check_cookies(cookies: str | Path | None, from_browser: str | None) -> None:
    """The cookie options' mistakes that show before any work: a missing file, an unknown browser."""
    if cookies is not None and not Path(cookies).is_file():
        raise UserError(f"--cookies {cookies}: no such file")
    if from_browser is not None:
        parse_browser(from_browser)


def private_cookies(cookies: str | Path | None, from_browser: str | None, dest: Path) -> Path | None:
    """Read the user's cookies once into ``dest`` (owner-only); None when none were given."""
    if cookies is None and from_browser is None:
        return None
    from yt_dlp.cookies import YoutubeDLCookieJar, extract_cookies_from_browser

    jar = YoutubeDLCookieJar()
    if cookies is not None:
        path = Path(cookies)
        if not path.is_file():
            raise UserError(f"--cookies {path}: no such file")
        try:
            jar.load(str(path), ignore_discard=True, ignore_expires=True)
        except Exception as exc:  # noqa: BLE001 - http.cookiejar raises LoadError, OSError, ...
            raise UserError(f"--cookies {path}: not a Netscape cookies.txt file ({exc})") from None
    if from_browser is not None:
        name, profile, keyring, container = parse_browser(from_browser)
        try:
            browser_jar = extract_cookies_from_browser(name, profile, keyring=keyring, container=container)
        except Exception as exc:  # noqa: BLE001 - a missing profile, a locked database, ...
            raise UserError(f"--cookies-from-browser {from_browser}: cannot read its cookies ({exc})") from None
        for cookie in browser_jar:
            jar.set_cookie(cookie)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    jar.save(str(dest), ignore_discard=True, ignore_expires=True)
    return dest


def js_runtimes() -> dict[str, dict]:
    """The JavaScript runtimes found, as yt-dlp's ``js_runtimes`` option: deno from the download
    extra (or on PATH), node and bun on PATH. Empty when there is none: YouTube will then offer
    few formats or none."""
    found: dict[str, dict] = {}
    try:
        import deno  # the PyPI package of the download extra

        found["deno"] = {"path": str(deno.find_deno_bin())}
    except Exception:  # noqa: BLE001 - not installed, or its binary missing
        if shutil.which("deno"):
            found["deno"] = {"path": shutil.which("deno")}
    for name in ("node", "bun"):
        if shutil.which(name):
            found[name] = {"path": shutil.which(name)}
    return found


def is_youtube(url_template: str) -> bool:
    return bool(re.search(r"(^|[/.])(youtube\.com|youtu\.be)/", url_template))


NO_JS_RUNTIME = (
    "no JavaScript runtime found (deno, node or bun): yt-dlp needs one for most YouTube formats; "
    "pip install 'pcavmae-cli[download]'"
)
