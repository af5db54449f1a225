"""Image path benchmark: naive Pillow vs vlserve's decode, and stdlib vs pybase64.

    .venv/bin/python -m bench.images [--repeats N] [--check] [--baseline-python PY]

Inputs are generated, photo-like (colour fields, texture, hard-edged shapes, grain), so
the JPEG entropy decoder and the resizer see realistic work. Naive = Pillow open, convert
to RGB, LANCZOS to the target; vlserve = `decode_image` (bytes → RGB bytes at the target,
content hash included). Both run interleaved so machine noise hits them alike; the table
shows medians. PSNR compares vlserve's pixels with the naive ones.

Under pillow-simd the naive path gets faster too, so the goals are stated against what
people run today, the naive path on stock Pillow: `--baseline-python .venv/bin/python`
times it on the same bytes in that interpreter (scripts/test-images-pillow-simd.sh does).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import gc
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pybase64
from PIL import Image, ImageDraw, ImageFilter

from server.images import decode_image, image_backend_info, target_size

MIN_PSNR_DB = 35.0
# Required speed-ups (naive / vlserve) with stock Pillow and with pillow-simd.
GOALS = {
    ("12MP JPEG", 1024): (3.0, 4.5),
    ("12MP JPEG", 336): (5.0, 6.0),
    ("1080p JPEG", 1024): (1.5, 3.0),
}
BASE64_GOAL = 5.0
TARGETS = (1024, 336)


@dataclass
class Row:
    case: str
    target: int
    naive_ms: float  # the naive path with this process's Pillow
    vlserve_ms: float
    decode_ms: float
    resize_ms: float
    psnr_db: float
    goal: float | None
    stock_naive_ms: float | None = None  # the naive path with stock Pillow (--baseline-python)

    @property
    def baseline_ms(self) -> float:
        """What the goal is measured against: the naive path on stock Pillow."""
        return self.naive_ms if self.stock_naive_ms is None else self.stock_naive_ms


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields, mid-frequency texture, hard-edged shapes and sensor grain."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    image = field.resize((width, height), Image.Resampling.BICUBIC)
    texture = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
    image = Image.blend(image, texture.resize((width, height), Image.Resampling.BILINEAR), 0.25)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w = int(rng.integers(width // 40, width // 5))
        h = int(rng.integers(height // 40, height // 5))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.int16)
    pixels = pixels + rng.normal(0, 4, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, "JPEG", quality=90)
    else:
        image.save(buf, fmt)
    return buf.getvalue()


def naive(data: bytes, max_side: int) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return image.resize(target_size(*image.size, max_side), Image.Resampling.LANCZOS)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def interleaved(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Run each function once per round, `repeats` rounds after one warm-up; seconds."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    gc.disable()
    try:
        for _ in range(repeats):
            for fn, out in zip(fns, times, strict=True):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def bench_image(case: str, data: bytes, max_side: int, repeats: int, simd: bool) -> Row:
    stats: list[tuple[float, float]] = []

    def ours() -> None:
        out = decode_image(data, max_side)
        stats.append((out.decode_s, out.resize_s))

    t_naive, t_ours = interleaved([lambda: naive(data, max_side).tobytes(), ours], repeats)
    reference = np.asarray(naive(data, max_side))
    out = decode_image(data, max_side)
    pixels = np.frombuffer(out.rgb, np.uint8).reshape(out.height, out.width, 3)
    assert pixels.shape == reference.shape, (pixels.shape, reference.shape)
    goal = GOALS.get((case, max_side))
    return Row(case, max_side, _ms(t_naive), _ms(t_ours),
               _ms([s[0] for s in stats]), _ms([s[1] for s in stats]),
               psnr(pixels, reference), None if goal is None else goal[simd])


def bench_base64(repeats: int) -> tuple[float, float, int]:
    payload = np.random.default_rng(0).integers(0, 256, 3_500_000, dtype=np.uint8).tobytes()
    text = base64.b64encode(payload).decode()  # ~4.7 MB, a 3.5 MB photo as a data URL
    assert pybase64.b64decode(text, validate=True) == base64.b64decode(text, validate=True)
    t_std, t_fast = interleaved([lambda: base64.b64decode(text, validate=True),
                                 lambda: pybase64.b64decode(text, validate=True)], repeats)
    try:  # sanity: both reject the same junk
        pybase64.b64decode(text[:-1] + "!", validate=True)
        raise AssertionError("pybase64 accepted invalid base64")
    except (binascii.Error, ValueError):
        pass
    return _ms(t_std), _ms(t_fast), len(text)


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def naive_only(folder: Path, repeats: int) -> dict[str, float]:
    """Median naive ms per `<case>@<target>` for the inputs saved in `folder`."""
    out = {}
    for path in sorted(folder.glob("*.bin")):
        data = path.read_bytes()
        for side in TARGETS:
            (times,) = interleaved([lambda d=data, s=side: naive(d, s).tobytes()], repeats)
            out[f"{path.stem}@{side}"] = _ms(times)
    return out


def stock_baseline(python: str, inputs: list[tuple[str, bytes]], repeats: int) -> dict[str, float]:
    """Run the naive path under another interpreter (stock Pillow) on the same bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, (_, data) in enumerate(inputs):
            Path(tmp, f"{i}.bin").write_bytes(data)
        check = "import PIL, re, sys; sys.exit(bool(re.search(r'\\.post\\d+$', PIL.__version__)))"
        if subprocess.run([python, "-c", check], check=False).returncode != 0:
            raise SystemExit(f"--baseline-python {python} does not run stock Pillow")
        cmd = [python, "-m", "bench.images", "--naive-only", tmp, "--repeats", str(repeats)]
        result = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent)
    times = json.loads(result.stdout)
    return {f"{inputs[int(key.split('@')[0])][0]}@{key.split('@')[1]}": ms
            for key, ms in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per case")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a speed-up goal is missed (PSNR is always checked)")
    parser.add_argument("--baseline-python", metavar="PYTHON",
                        help="also time the naive path under this interpreter (stock Pillow); "
                             "the goals then compare against it")
    parser.add_argument("--naive-only", metavar="DIR", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive_only:
        print(json.dumps(naive_only(args.naive_only, args.repeats)))
        return 0

    info = image_backend_info()
    simd = bool(info["pillow_simd"])
    print("backend: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("generating inputs ...", flush=True)
    big, small = photo_like(4032, 3024, seed=1), photo_like(1920, 1080, seed=2)
    inputs = [("12MP JPEG", encode(big, "JPEG")), ("1080p JPEG", encode(small, "JPEG")),
              ("1080p PNG", encode(small, "PNG"))]
    stock: dict[str, float] = {}
    if args.baseline_python:
        print(f"timing the stock-Pillow baseline with {args.baseline_python} ...", flush=True)
        stock = stock_baseline(args.baseline_python, inputs, args.repeats)
    rows = [bench_image(case, data, side, args.repeats, simd)
            for case, data in inputs for side in TARGETS]
    for row in rows:
        row.stock_naive_ms = stock.get(f"{row.case}@{row.target}")
    b64_std, b64_fast, b64_len = bench_base64(args.repeats)
    failed = print_table(rows, (b64_std, b64_fast, b64_len), args.check)
    baseline = ("naive path on stock Pillow via --baseline-python" if stock
                else "naive path in this process")
    print(f"\nmedian of {args.repeats} rounds; vlserve includes the content hash; speed-up is "
          f"naive/vlserve in this process; goals ({'pillow-simd' if simd else 'stock Pillow'} + "
          f"simplejpeg) compare with the {baseline}")
    if simd and not stock:
        print("note: on pillow-simd the goals assume the stock-Pillow naive path as baseline; "
              "pass --baseline-python .venv/bin/python")
    for line in failed:
        print("FAIL:", line, file=sys.stderr)
    return 1 if failed else 0


def print_table(rows: list[Row], b64: tuple[float, float, int], check: bool) -> list[str]:
    """Print the one table; return the failures (PSNR always, speed goals with --check)."""
    stock = any(r.stock_naive_ms is not None for r in rows)
    extra = f" {'stock naive':>11} {'vs stock':>8}" if stock else ""
    header = (f"{'case':<12} {'target':>6} {'naive ms':>9} {'vlserve ms':>10} "
              f"{'(decode+resize)':>15} {'speed-up':>8}{extra} {'goal':>6} {'PSNR dB':>8}")
    print(f"\n{header}\n{'-' * len(header)}")
    failed = []
    for r in rows:
        split = f"{r.decode_ms:.1f}+{r.resize_ms:.1f}"
        vs_goal = r.baseline_ms / r.vlserve_ms
        goal = "-" if r.goal is None else f"{r.goal:.1f}x"
        mark = "" if r.goal is None or vs_goal >= r.goal else " MISSED"
        extra = ""
        if stock:
            extra = f" {r.stock_naive_ms or float('nan'):>11.1f} {vs_goal:>7.1f}x"
        print(f"{r.case:<12} {r.target:>6} {r.naive_ms:>9.1f} {r.vlserve_ms:>10.1f} "
              f"{split:>15} {r.naive_ms / r.vlserve_ms:>7.1f}x{extra} {goal:>6} "
              f"{r.psnr_db:>8.1f}{mark}")
        if r.psnr_db < MIN_PSNR_DB:
            failed.append(f"{r.case} -> {r.target}: PSNR {r.psnr_db:.1f} dB < {MIN_PSNR_DB}")
        if check and mark:
            failed.append(f"{r.case} -> {r.target}: {vs_goal:.1f}x < {r.goal}x")
    b64_std, b64_fast, b64_len = b64
    ratio = b64_std / b64_fast
    mark = "" if ratio >= BASE64_GOAL else " MISSED"
    extra = f" {'':>11} {'':>8}" if stock else ""
    print(f"{'base64':<12} {b64_len / 1e6:>5.1f}M {b64_std:>9.1f} {b64_fast:>10.1f} "
          f"{'stdlib/pybase64':>15} {ratio:>7.1f}x{extra} {BASE64_GOAL:>5.1f}x {'-':>8}{mark}")
    if check and mark:
        failed.append(f"base64: {ratio:.1f}x < {BASE64_GOAL}x")
    return failed


if __name__ == "__main__":
    sys.exit(main())
