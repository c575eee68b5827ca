"""Make docs/browse.png: `m2t browse` on a small real archive, in headless Chromium.

    .venv/bin/python docs/make_browse_screenshot.py [--out docs/browse.png]

Compresses 12 BSDS500 photos from ../shared/datasets/train/bsds500 (scaled to 240x160)
and one truncated file (an `error` row) with the shipped default model, in-process, into a
temporary archive; serves it on a free loopback port; waits until every tile shows its full
decode (each tile shows its preview first, then the full decode scaled to the tile); saves a
screenshot (palette-quantised if it would be over ~400 KB). Needs chromium and
chromium-driver (`make browser-deps`) and selenium (the test extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from pipeline.browse import server as B  # noqa: E402
from pipeline.jobs import compress as C  # noqa: E402

PHOTOS = REPO / ".." / "shared" / "datasets" / "train" / "bsds500" / "train"
COUNT, SIZE = 12, (240, 160)
MAX_BYTES = 400_000


def make_corpus(root: Path) -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    if not photos:
        sys.exit(f"no photos in {PHOTOS.resolve()}")
    picked = [p for p in photos if Image.open(p).width > Image.open(p).height][::7][:COUNT]  # landscape ones
    folder = root / "bsds500"
    folder.mkdir(parents=True)
    for path in picked:
        image = Image.open(path).convert("RGB").resize(SIZE, Image.Resampling.LANCZOS)
        image.save(folder / f"{path.stem}.png")
    buf = io.BytesIO()
    Image.open(picked[0]).convert("RGB").resize(SIZE).save(buf, format="PNG")
    (folder / "scan-truncated.png").write_bytes(buf.getvalue()[:300])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "browse.png"))
    parser.add_argument("--preview-steps", type=int, default=B.DEFAULT_PREVIEW_STEPS)
    args = parser.parse_args()
    args.out = str(Path(args.out).resolve())
    cwd = os.getcwd()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_corpus(tmp / "in")
        os.chdir(tmp)  # the page shows the archive URL as given: a short relative one
        archive = Path("photos.m2t")
        cfg = C.load_config(None, ["ray.enabled=false", "torch_threads=1", "shard_size=8"])
        cfg = dataclasses.replace(cfg, input=str(tmp / "in"), output=str(archive))
        t0 = time.perf_counter()
        report, _ = C.compress_dataset(cfg, progress=False)
        print(f"compressed {report['totals']['images']} images in {time.perf_counter() - t0:.1f} s")

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        browser = B.Browser(str(archive), preview_steps=args.preview_steps)
        server = B.make_server(browser, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1180,1010", "--hide-scrollbars", "--force-device-scale-factor=1"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
        try:
            driver.get(B.url_of(server))
            ok = report["totals"]["ok"]
            WebDriverWait(driver, 300).until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('.tile.status-ok img.full')]"
                ".filter(i => i.complete && i.naturalWidth > 0).length") == ok)
            time.sleep(0.3)
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
            server.shutdown()
            server.server_close()
            os.chdir(cwd)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    if out.tell() > MAX_BYTES:
        out = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            out, format="PNG", optimize=True)
    Path(args.out).write_bytes(out.getvalue())
    print(f"{args.out}: {image.width}x{image.height}, {out.tell()} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
