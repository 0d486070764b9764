"""Download throughput, window vs whole-video fetching, against the local media server.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/download_throughput.py --clips 8 --jobs 2 --repeats 3

``pcav download`` is pointed at ``engine/bench/media_server.py`` serving a 5-minute video
(``make_numbered_video``: H.264 at a tiny size plus 128 kb/s stereo AAC, YouTube's audio rate),
once per clip ID. Each round downloads ``--clips`` 10 s windows at spread-out offsets into a
fresh folder, once with ``--fetch whole`` and once with ``--fetch window``, the sides taking turns
(A, B, A, B, ...) so that both see the same machine; ``--repeats`` rounds. For each side it prints
clips/min and the bytes the server sent per clip (min and median over the rounds), the load
average, and what a 2M-clip AudioSet run would take at that rate with ``--jobs`` jobs and how
many bytes it would move.

What the local figures are and are not: the server is on the same machine, so a clip costs what
yt-dlp and ffmpeg cost (the CPU), not what the network costs; clips/min here is a ceiling set by
this machine's cores. Bytes per clip do carry over: they are what the site would send. On
YouTube the rate is set by its rate limits long before the CPU (README, "AudioSet and VGGSound").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pcavmae_cli.engine.bench.media_server import MediaServer, make_numbered_video
from pcavmae_cli.engine.data import download as dl
from pcavmae_cli.engine.data.pacing import Pacing
from pcavmae_cli.engine.data.segments import Segment

AUDIOSET_CLIPS = 2_000_000


def one_round(server: MediaServer, fetch: str, ids: list[str], starts: list[float], jobs: int, work: Path) -> dict:
    out = work / f"out-{fetch}"
    shutil.rmtree(out, ignore_errors=True)
    rows = [Segment(ytid=y, start=s, end=s + 10.0, labels=("/m/09x0r",)) for y, s in zip(ids, starts)]
    first = len(server.log)
    began = time.perf_counter()
    report = dl.download_segments(rows, out, url_template=server.template, jobs=jobs, fetch=fetch, pacing=Pacing())
    seconds = time.perf_counter() - began
    time.sleep(0.2)  # let the server threads log their last requests
    if report.failures:
        raise RuntimeError(f"{fetch}: {report.failed_by_reason()}")
    served = sum(s.bytes for s in server.log[first:])
    n = len(report.downloaded)
    return {"clips_per_min": 60 * n / seconds, "bytes_per_clip": served / n, "seconds": seconds}


def fmt_days(clips_per_min: float, clips: int = AUDIOSET_CLIPS) -> str:
    minutes = clips / clips_per_min
    return f"{minutes / 60 / 24:.1f} days"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--video-seconds", type=float, default=300)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pcav-dl-bench-"))
    try:
        served = work / "served"
        served.mkdir()
        make_numbered_video(served / "v.mp4", args.video_seconds)
        size = (served / "v.mp4").stat().st_size
        ids = [f"v{i}" for i in range(args.clips)]
        for y in ids:
            os.link(served / "v.mp4", served / f"{y}.mp4")
        span = args.video_seconds - 10.0
        starts = [round(span * (i + 0.5) / args.clips, 1) for i in range(args.clips)]
        print(f"source: {args.video_seconds:g} s, {size / 1e6:.2f} MB; {args.clips} clips of 10 s, "
              f"{args.jobs} jobs, {args.repeats} rounds (whole, window alternating)")  # fmt: skip
        results: dict[str, list[dict]] = {"whole": [], "window": []}
        loads = [os.getloadavg()[0]]
        with MediaServer(served) as server:
            for r in range(args.repeats):
                for side in ("whole", "window"):
                    res = one_round(server, side, ids, starts, args.jobs, work)
                    results[side].append(res)
                    loads.append(os.getloadavg()[0])
                    print(f"  round {r + 1} {side:6s}: {res['clips_per_min']:6.1f} clips/min "
                          f"{res['bytes_per_clip'] / 1e6:6.3f} MB/clip ({res['seconds']:.2f} s)", flush=True)  # fmt: skip
        print(f"load average (1 min) during the run: {min(loads):.2f} .. {max(loads):.2f}")
        print(f"{'side':8s} {'clips/min min':>14s} {'median':>8s} {'MB/clip min':>12s} {'median':>8s}  "
              f"2M clips at the median, {args.jobs} jobs")  # fmt: skip
        for side, rows in results.items():
            rates = [x["clips_per_min"] for x in rows]
            per_clip = [x["bytes_per_clip"] for x in rows]
            med_rate, med_bytes = statistics.median(rates), statistics.median(per_clip)
            print(f"{side:8s} {min(rates):14.1f} {med_rate:8.1f} {min(per_clip) / 1e6:12.3f} {med_bytes / 1e6:8.3f}  "
                  f"{fmt_days(med_rate)}, {med_bytes * AUDIOSET_CLIPS / 1e12:.2f} TB moved")  # fmt: skip
        ratio = statistics.median(x["bytes_per_clip"] for x in results["whole"]) / statistics.median(
            x["bytes_per_clip"] for x in results["window"])
        print(f"whole / window bytes per clip: {ratio:.1f}x (source {args.video_seconds:g} s, clip 10 s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
