"""Benchmark: reading a customer's PDF for the model (media.document.PdfReader: pdftotext in a subprocess)
against pypdf, the usual pure-Python choice, reading the same pages in the bot's own process.

For a one-page receipt, a 30-page document and a 200-page catalogue (of which both read the first 30 pages),
runs each side 5 times, alternating, each run in a fresh Python process so its peak RSS is its own, and
prints medians: wall time, the bot process's peak RSS over its RSS just before (the PDF's bytes already
read), and the ratios ours/pypdf.

    python -m bench.pdfs           # about 15 s on 2 CPUs
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 5
LINE = "Artículo {n}: zapatilla de running, talla 38-46, precio 59,90 EUR, envío en 24/48 h."
DOCUMENTS = (("receipt, 1 page", 1), ("document, 30 pages", 30), ("catalogue, 200 pages", 200))


def make_pdf(path: Path, pages: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.pdfs import text_pdf

    path.write_bytes(text_pdf(*[[LINE.format(n=page * 50 + n) for n in range(50)] for page in range(pages)]))


def worker(mode: str, src: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import psutil

    from media.document import MAX_PAGES, PdfReader, PdfText

    data = src.read_bytes()
    # Imported and made before the baseline, as the bot has them from its start.
    from pypdf import PdfReader as PyPdfReader

    loop = asyncio.new_event_loop()
    reader = PdfReader(enabled=True)
    before = psutil.Process().memory_info().rss // 1024
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far (the imports') starts again from now
    started = time.perf_counter()
    if mode == "ours":
        read = loop.run_until_complete(reader.read(data))
        assert isinstance(read, PdfText)
        text = read.text
    else:
        pages = PyPdfReader(io.BytesIO(data)).pages
        text = "\n".join(page.extract_text() for page in pages[:MAX_PAGES])
    elapsed = time.perf_counter() - started
    grew = peak_kb() - before
    print(json.dumps({"s": elapsed, "grew_kb": grew, "chars": len(text)}))


def peak_kb() -> int:
    """This process's peak RSS since /proc/self/clear_refs was last written "5" (VmHWM)."""
    status = Path("/proc/self/status").read_text().splitlines()
    line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1])


def run(mode: str, src: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.pdfs", "--worker", mode, str(src)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, pages in DOCUMENTS:
            src = Path(folder) / f"doc{pages}.pdf"
            make_pdf(src, pages)
            results: dict[str, list[dict[str, float]]] = {"ours": [], "pypdf": []}
            for _ in range(RUNS):
                for mode in results:
                    results[mode].append(run(mode, src))

            def median(mode: str, key: str, results: dict[str, list[dict[str, float]]] = results) -> float:
                return statistics.median(r[key] for r in results[mode])

            rows.append(
                (
                    label,
                    src.stat().st_size / 1024,
                    median("ours", "s") * 1000,
                    median("pypdf", "s") * 1000,
                    median("ours", "grew_kb") / 1024,
                    median("pypdf", "grew_kb") / 1024,
                )
            )
    print(f"PDF text for the model, medians of {RUNS} runs each, fresh process per run")
    print(f"{'PDF':<22}{'KiB':>6}{'ours ms':>9}{'pypdf ms':>9}{'ratio':>7}{'ours MiB':>9}{'pypdf MiB':>10}")
    for label, size, ours_ms, pypdf_ms, ours_mb, pypdf_mb in rows:
        print(
            f"{label:<22}{size:>6.0f}{ours_ms:>9.0f}{pypdf_ms:>9.0f}{ours_ms / pypdf_ms:>7.2f}"
            f"{ours_mb:>9.1f}{pypdf_mb:>10.1f}"
        )
    print("MiB: the bot process's peak RSS over its RSS just before reading the PDF. pdftotext's own memory")
    print("(about 10 MB on a receipt, by GNU time) is a subprocess: freed when it exits")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
