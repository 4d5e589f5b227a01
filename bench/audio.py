"""Benchmark: our voice-note compression against a plain ffmpeg command doing the same transcode.

For 1, 5 and 10 minutes of Spanish speech (espeak-ng, looped with ffmpeg, stored as a 32 kbit/s Ogg/Opus voice
note), runs each side 3 times, alternating, each run in a fresh Python process so peak RSS is per run:

- ours:  media.probe.probe + media.compress.to_opus (what VoiceTranscriber does before the upload)
- plain: ffmpeg -i IN -ac 1 -ar 16000 -c:a libopus -b:a 24k -application voip OUT

and prints medians: wall time, peak RSS of the ffmpeg child(ren) (getrusage RUSAGE_CHILDREN in the worker),
how much the worker's own Python RSS grew (ours must not grow with the audio's length), the ratios ours/plain,
and bytes before/after. One pydub AudioSegment run on the 10-minute note is shown for contrast.

    python bench/audio.py            # about 2 minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINUTES = (1, 5, 10)
RUNS = 3
TEXT = (
    "Hola, buenas tardes. Quisiera saber el horario de la tienda el sábado, y si hacen envíos a domicilio "
    "en el centro de la ciudad. También me gustaría conocer los precios de los productos nuevos. "
)


def plain_argv(src: Path, dst: Path) -> list[str]:
    return [
        "ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src),
        "-ac", "1", "-ar", "16000", "-c:a", "libopus", "-b:a", "24k", "-application", "voip", str(dst),
    ]  # fmt: skip


# -- worker: one measured run in a fresh process ---


def _self_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(mode: str, src: Path, dst: Path) -> None:
    sys.path.insert(0, str(ROOT))
    if mode == "ours":
        from media.compress import to_opus
        from media.probe import probe

        async def job() -> None:
            found = await probe(src)
            await to_opus(src, dst, bitrate="24k", max_duration_s=found.duration_s or 3600, timeout_s=300)

    elif mode == "pydub":
        import warnings

        warnings.simplefilter("ignore", DeprecationWarning)  # audioop on 3.11+
        from pydub import AudioSegment

    base = _self_rss_kb()
    started = time.perf_counter()
    if mode == "ours":
        asyncio.run(job())
    elif mode == "plain":
        subprocess.run(plain_argv(src, dst), check=True)
    else:
        segment = AudioSegment.from_file(src).set_channels(1).set_frame_rate(16000)
        segment.export(dst, format="ogg", codec="libopus", bitrate="24k")
    wall = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"wall_s": wall, "child_kb": children, "py_growth_kb": _self_rss_kb() - base}))


def measure(mode: str, src: Path, dst: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", mode, str(src), str(dst)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


# -- driver ---


def make_inputs(work: Path) -> dict[int, Path]:
    speech = work / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "es", "-w", str(speech), TEXT * 3], check=True)
    inputs = {}
    for minutes in MINUTES:
        path = work / f"note_{minutes}min.ogg"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-y", "-stream_loop", "-1", "-i", str(speech),
             "-t", str(minutes * 60), "-ac", "1", "-ar", "48000",
             "-c:a", "libopus", "-b:a", "32k", str(path)],
            check=True,
        )  # fmt: skip
        inputs[minutes] = path
    return inputs


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    for tool in ("ffmpeg", "ffprobe", "espeak-ng"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (apt-get install ffmpeg espeak-ng)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-audio-") as tmp:
        work = Path(tmp)
        inputs = make_inputs(work)
        rows = []
        for minutes, src in inputs.items():
            results: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
            sizes: dict[str, int] = {}
            for _ in range(RUNS):
                for mode in results:  # alternate so drift hits both sides alike
                    dst = work / f"{mode}_{minutes}.ogg"
                    results[mode].append(measure(mode, src, dst))
                    sizes[mode] = dst.stat().st_size
                    dst.unlink()
            rows.append((minutes, src.stat().st_size, sizes, results))

        header = (
            f"{'audio':>7} | {'ours s':>6} {'plain s':>7} {'ratio':>5}"
            f" | {'ours MB':>7} {'plain MB':>8} {'ratio':>5} | {'py +MB':>6}"
            f" | {'in KB':>7} {'out KB':>7} {'plain KB':>8} {'saved':>5}"
        )
        print(
            f"medians of {RUNS} runs; MB = peak RSS of the ffmpeg child; py +MB = our Python process's growth"
        )
        print(header)
        print("-" * len(header))
        for minutes, size_in, sizes, results in rows:
            ours_s, plain_s = median(results["ours"], "wall_s"), median(results["plain"], "wall_s")
            ours_mb, plain_mb = (
                median(results["ours"], "child_kb") / 1024,
                median(results["plain"], "child_kb") / 1024,
            )
            growth = median(results["ours"], "py_growth_kb") / 1024
            saved = 1 - sizes["ours"] / size_in
            print(
                f"{minutes:>4}min | {ours_s:>6.2f} {plain_s:>7.2f} {ours_s / plain_s:>5.2f} | {ours_mb:>7.1f}"
                f" {plain_mb:>8.1f} {ours_mb / plain_mb:>5.2f} | {growth:>6.1f} | {size_in / 1024:>7.0f}"
                f" {sizes['ours'] / 1024:>7.0f} {sizes['plain'] / 1024:>8.0f} {saved:>5.0%}"
            )

        src = inputs[MINUTES[-1]]
        dst = work / "pydub.ogg"
        pydub = measure("pydub", src, dst)
        print(
            f"\ncontrast, pydub AudioSegment on the {MINUTES[-1]}-minute note (1 run):"
            f" {pydub['wall_s']:.2f}s,"
            f" Python process +{pydub['py_growth_kb'] / 1024:.0f} MB (raw PCM in memory),"
            f" ffmpeg children {pydub['child_kb'] / 1024:.0f} MB"
        )
    print(f"bench took {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, src, dst = args.worker
        worker(mode, Path(src), Path(dst))
    else:
        main()
