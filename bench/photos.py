"""Benchmark: preparing a customer's photo for the model (media.image.shrink) against a plain Pillow
open-load-thumbnail of the same photo.

For a standard WhatsApp photo (1600x1200 JPEG), an HD one (4000x3000 JPEG) and a phone screenshot
(1080x2400 PNG), runs each side 5 times, alternating, each run in a fresh Python process so its peak RSS is
its own, and prints medians: wall time, the process's peak RSS over its RSS just before (the photo's bytes
already read), bytes in and out, and the ratios ours/plain.

    python -m bench.photos           # about 30 s on 2 CPUs
"""

from __future__ import annotations

import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 5
PHOTOS = (("standard JPEG 1600x1200", 1600, 1200, "JPEG"), ("HD JPEG 4000x3000", 4000, 3000, "JPEG"),
          ("screenshot PNG 1080x2400", 1080, 2400, "PNG"))  # fmt: skip


def make_photo(path: Path, width: int, height: int, fmt: str) -> None:
    """Noise over a gradient: compresses like a real photo, not like a flat colour."""
    from PIL import Image

    noise = Image.effect_noise((width, height), 40).convert("RGB")
    gradient = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    Image.blend(noise, gradient, 0.5).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def worker(mode: str, src: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import psutil
    from PIL import Image

    from media.image import MAX_SIDE, shrink

    data = src.read_bytes()
    before = psutil.Process().memory_info().rss // 1024  # now, not the peak of the imports
    started = time.perf_counter()
    if mode == "ours":
        out = shrink(data, MAX_SIDE)
    else:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.thumbnail((MAX_SIDE, MAX_SIDE))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=85)
            out = buffer.getvalue()
    elapsed = time.perf_counter() - started
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"s": elapsed, "grew_kb": grew, "in": len(data), "out": len(out)}))


def run(mode: str, src: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.photos", "--worker", mode, str(src)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, width, height, fmt in PHOTOS:
            src = Path(folder) / f"photo.{fmt.lower()}"
            # Made in a process of its own: a child's peak RSS starts at its parent's (kept across exec).
            subprocess.run(
                [sys.executable, "-m", "bench.photos", "--make", str(src), str(width), str(height), fmt],
                cwd=ROOT,
                check=True,
            )
            results: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
            for _ in range(RUNS):
                for mode in results:
                    results[mode].append(run(mode, src))

            def median(mode: str, key: str, results: dict[str, list[dict[str, float]]] = results) -> float:
                return statistics.median(r[key] for r in results[mode])

            rows.append(
                (
                    label,
                    median("ours", "in") / 1024,
                    median("ours", "out") / 1024,
                    median("ours", "s") * 1000,
                    median("plain", "s") * 1000,
                    median("ours", "grew_kb") / 1024,
                    median("plain", "grew_kb") / 1024,
                )
            )
    print(f"photo for the model, medians of {RUNS} runs each, fresh process per run")
    print(
        f"{'photo':<26}{'in KiB':>8}{'out KiB':>8}{'ours ms':>9}{'plain ms':>9}{'ratio':>7}"
        f"{'ours MiB':>9}{'plain MiB':>10}{'ratio':>7}"
    )
    for label, size_in, size_out, ours_ms, plain_ms, ours_mb, plain_mb in rows:
        print(
            f"{label:<26}{size_in:>8.0f}{size_out:>8.0f}{ours_ms:>9.0f}{plain_ms:>9.0f}"
            f"{ours_ms / plain_ms:>7.2f}{ours_mb:>9.1f}{plain_mb:>10.1f}{ours_mb / max(plain_mb, 0.1):>7.2f}"
        )
    print("MiB: the process's peak RSS over its RSS just before preparing the photo")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) == 6 and sys.argv[1] == "--make":
        make_photo(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
