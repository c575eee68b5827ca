"""`m2t browse` (pipeline/browse.py): the JSON API with Flask's test client, and the page in a
real headless browser (Debian's chromium + chromium-driver, driven by Selenium).

The archive is compressed in-process with the tiny model of test_compress (4 coding steps;
previews of 2), from five 64x48 images: keys with '/', spaces and unicode, a truncated PNG
(an `error` row) and one key given twice (a `duplicate` row).

Without chromium/chromedriver/selenium the browser test skips, unless M2T_REQUIRE_BROWSER=1
(CI: .ci/run), where it fails. `make browser-deps` installs them (root).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import m2t_core
from m2t_core import save_checkpoint
from pipeline.cli import main as m2t_main
from pipeline.storage import archive as A
from pipeline.browse import server as B
from pipeline.jobs import compress as C
from test_compress import TINY, build_model, job_config, png_bytes, random_image

REPO = Path(__file__).resolve().parent.parent
H, W = 48, 64
PREVIEW_STEPS = 2  # of TINY's 4
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
GOOD = ["photos/a b/été 0.png", "photos/img1.png", "dup.png"]  # dup.png is in both inputs
BROKEN = "photos/truncated.png"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bmodel") / "tiny-browse.safetensors"
    save_checkpoint(build_model(TINY, model_id="tiny-browse"), path)
    # Installed, as a user would: bitstreams pick their model from the registry by name + hash.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2T_MODEL_PATH", os.pathsep.join(filter(None, [str(path.parent), os.environ.get("M2T_MODEL_PATH")])))
        yield path


@pytest.fixture(scope="module")
def archive(tmp_path_factory, checkpoint) -> Path:
    root = tmp_path_factory.mktemp("bcorpus")
    a, b = root / "a", root / "b"
    (a / "photos" / "a b").mkdir(parents=True)
    b.mkdir()
    (a / "photos" / "a b" / "été 0.png").write_bytes(png_bytes(random_image(H, W, seed=1)))
    (a / "photos" / "img1.png").write_bytes(png_bytes(random_image(H, W, seed=2)))
    (a / "photos" / "truncated.png").write_bytes(png_bytes(random_image(H, W, seed=3))[:200])
    (a / "dup.png").write_bytes(png_bytes(random_image(H, W, seed=4)))
    (b / "dup.png").write_bytes(png_bytes(random_image(H, W, seed=5)))
    out = tmp_path_factory.mktemp("barchive") / "a.m2t"
    report, code = C.compress_dataset(job_config([str(a), str(b)], out, checkpoint, "ray.enabled=false"),
                                      progress=False)
    assert report["totals"]["ok"] == 3 and report["totals"]["error"] == 1 and report["totals"]["duplicate"] == 1, report
    return out


@pytest.fixture(scope="module")
def browser(archive):
    return B.Browser(str(archive), preview_steps=PREVIEW_STEPS)


@pytest.fixture(scope="module")
def client(browser):
    return B.make_app(browser, B.LOOPBACK_NAMES).test_client()


def quote(key: str) -> str:
    return urllib.parse.quote(key, safe="")  # as the page's encodeURIComponent


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ====================================================================== the JSON API


def test_summary_and_rows(client):
    s = client.get("/api/summary").get_json()
    assert s["rows"] == 5 and s["counts"] == {"ok": 3, "error": 1, "duplicate": 1}
    assert s["complete"] and not s["warnings"]
    page = client.get("/api/rows").get_json()
    assert page["total"] == 5
    keys = [r["key"] for r in page["rows"]]
    assert keys == sorted(keys) and set(keys) == {*GOOD, BROKEN}
    ok = next(r for r in page["rows"] if r["key"] == "photos/img1.png")
    assert ok["status"] == "ok" and ok["width"] == W and ok["height"] == H
    assert ok["bpp"] > 0 and ok["length"] > 0 and (ok["psnr"] == "inf" or ok["psnr"] > 0)
    bad = next(r for r in page["rows"] if r["key"] == BROKEN)
    assert bad["status"] == "error" and bad["error"] and bad["length"] is None


def test_pagination_filter_search(client):
    seen = []
    for offset in range(0, 6, 2):
        page = client.get(f"/api/rows?offset={offset}&limit=2").get_json()
        assert page["total"] == 5 and len(page["rows"]) == min(2, 5 - offset)
        seen += [(r["key"], r["status"]) for r in page["rows"]]
    assert len(seen) == len(set(seen)) == 5
    assert client.get("/api/rows?offset=10").get_json()["rows"] == []
    errors = client.get("/api/rows?status=error").get_json()
    assert [r["key"] for r in errors["rows"]] == [BROKEN] and errors["total"] == 1
    dups = client.get("/api/rows?status=duplicate").get_json()["rows"]
    assert [r["key"] for r in dups] == ["dup.png"] and "already taken" in dups[0]["error"]
    assert client.get("/api/rows?status=ok").get_json()["total"] == 3
    found = client.get("/api/rows?" + urllib.parse.urlencode({"q": "été"})).get_json()
    assert [r["key"] for r in found["rows"]] == [GOOD[0]]
    assert client.get("/api/rows?q=photos/&status=ok").get_json()["total"] == 2
    assert client.get("/api/rows?q=nothing-like-this").get_json()["total"] == 0
    for bad in ("status=broken", "limit=0", "limit=100000", "offset=-1", "offset=x"):
        r = client.get(f"/api/rows?{bad}")
        assert r.status_code == 400 and r.get_json()["error"]


def test_images_previews_and_errors(client, archive, checkpoint):
    full = client.get(f"/image/{quote(GOOD[0])}.png")
    assert full.status_code == 200 and full.mimetype == "image/png"
    rgb = decode_png(full.data)
    assert np.array_equal(rgb, A.get_image(str(archive), GOOD[0]))
    preview = client.get(f"/preview/{quote(GOOD[0])}.png")
    assert preview.status_code == 200 and decode_png(preview.data).shape == (H, W, 3)
    want = A.get_image(str(archive), GOOD[0], steps=PREVIEW_STEPS)
    assert np.array_equal(decode_png(preview.data), want)
    assert not np.array_equal(want, rgb)  # 2 of 4 steps: a real preview, not the full image
    # A duplicated key serves its kept (ok) copy.
    assert client.get("/image/dup.png.png").status_code == 200
    for path in (f"/image/{quote('no/such key.png')}.png", "/preview/nope.png", f"/image/{quote(BROKEN)}.png"):
        r = client.get(path)
        assert r.status_code == 404 and r.is_json, path
    assert "status error" in client.get(f"/image/{quote(BROKEN)}.png").get_json()["error"]
    assert client.get("/no-such-page").status_code == 404
    # A request for another host name (DNS rebinding) is refused.
    assert client.get("/api/summary", headers={"Host": "evil.example:8765"}).status_code == 403


def test_tiles_end_on_the_full_decode_scaled_down(client, browser, archive, monkeypatch):
    """/thumb/ is the full decode scaled to the tile; serving a preview queues it on the pool
    (the cache is filled while the page shows previews)."""
    key = GOOD[1]
    browser.cache = B.PngCache()  # empty: what a fresh server has
    assert client.get(f"/preview/{quote(key)}.png").status_code == 200
    deadline = time.monotonic() + 30
    while browser.cache.get(("thumb", key)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert browser.cache.get(("thumb", key)) is not None  # prefetched, not yet asked for
    thumb = client.get(f"/thumb/{quote(key)}.png")
    assert thumb.status_code == 200 and thumb.data == browser.cache.get(("thumb", key))
    assert np.array_equal(decode_png(thumb.data), A.get_image(str(archive), key))  # 64x48: not scaled
    monkeypatch.setattr(B, "PREVIEW_MAX_SIDE", 32)
    small = B.Browser(str(archive), preview_steps=PREVIEW_STEPS)
    assert decode_png(small.png(key, "thumb")).shape == (24, 32, 3)
    assert client.get(f"/thumb/{quote(BROKEN)}.png").status_code == 404


def test_decode_pool_runs_requests_before_prefetches_and_in_parallel(archive):
    pool = B.DecodePool(1)
    gate, order = threading.Event(), []
    first = pool.submit("block", gate.wait)
    later = pool.submit("prefetch", lambda: order.append("prefetch"), priority=1)
    now = pool.submit("request", lambda: order.append("request"))
    assert pool.submit("request", lambda: order.append("twice")) is now  # one job per key
    gate.set()
    for future in (first, later, now):
        future.result(timeout=30)
    assert order == ["request", "prefetch"]
    # Two workers decoding at once give the pixels of one decode at a time.
    browser = B.Browser(str(archive), preview_steps=PREVIEW_STEPS, decode_workers=2)
    futures = {k: browser._queue(k, "full", 0) for k in GOOD}
    for key, future in futures.items():
        assert np.array_equal(decode_png(future.result(timeout=60)), A.get_image(str(archive), key))


def test_decode_failure_is_500_with_the_message(archive):
    def broken(*args, **kwargs):
        raise A.ArchiveError("the bytes do not match the index")

    client = B.make_app(B.Browser(str(archive), get_image=broken)).test_client()
    r = client.get(f"/preview/{quote(GOOD[1])}.png")
    assert r.status_code == 500 and "do not match the index" in r.get_json()["error"]


def test_png_cache_is_bounded():
    cache = B.PngCache(max_bytes=10)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    assert cache.get("a")  # a is now the most recent
    cache.put("c", b"123")
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and cache.bytes == 8
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None


def test_large_index_and_unsafe_shards(tmp_path):
    """100k rows: loaded into one Arrow table; a filtered page is quick. A stats file that
    names a shard outside the archive's naming is skipped with a warning."""
    n = 100_000
    shards = tmp_path / "big" / "shards"
    shards.mkdir(parents=True)
    keys = [f"img/{i:06d}.jpg" for i in range(n)]
    status = np.where(np.arange(n) % 10 == 3, "error", "ok")
    table = pa.table({
        "key": keys, "source": [None] * n, "shard": ["00000"] * n,
        "offset": pa.array(np.arange(n) * 100, pa.int64()), "length": pa.array(np.full(n, 100), pa.int64()),
        "height": pa.array(np.full(n, 32), pa.int32()), "width": pa.array(np.full(n, 48), pa.int32()),
        "source_bytes": pa.array(np.full(n, 999), pa.int64()), "bpp": np.full(n, 0.5), "psnr": np.full(n, 30.0),
        "mse": np.full(n, 1.0), "crc32": pa.array(np.zeros(n), pa.int64()),
        "decoded_crc32": pa.array(np.zeros(n), pa.int64()), "status": status,
        "error": [("unreadable" if s == "error" else None) for s in status],
    })
    pq.write_table(table, shards / "00000.parquet")
    (shards / "00000.stats.json").write_text(json.dumps({"shard": "00000"}))
    (shards / "x.stats.json").write_text(json.dumps({"shard": "../../etc/passwd"}))
    t0 = time.perf_counter()
    b = B.Browser(str(tmp_path / "big"))
    loaded = time.perf_counter() - t0
    assert len(b.table) == n and b.counts == {"ok": 90_000, "error": 10_000, "duplicate": 0}
    assert any("unsafe shard name" in w for w in b.warnings)
    t0 = time.perf_counter()
    page = b.rows(offset=5000, limit=100, status="error", q="img/0")
    paged = time.perf_counter() - t0
    assert page["total"] == 10_000 and len(page["rows"]) == 100 and page["rows"][0]["key"] == "img/050003.jpg"
    assert loaded < 10 and paged < 1, (loaded, paged)


def test_cli(archive, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        m2t_main(["browse", "--help"])
    assert exc.value.code == 0 and "127.0.0.1" in capsys.readouterr().out
    assert m2t_main(["browse", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert m2t_main(["browse", str(tmp_path / "empty")]) == 2
    assert "not an m2t archive" in capsys.readouterr().err
    assert m2t_main(["browse", str(archive), "--preview-steps", "-1"]) == 2


def test_serves_until_ctrl_c(archive):
    """The real command: prints its URL, answers, and stops cleanly on SIGINT."""
    # SIGINT back to its default in the child: a shell's background job (a test run started
    # with `&`) ignores it, and Python keeps an inherited "ignore".
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.browse.server", str(archive), "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "browse it at" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "browse it at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split()[3]
        import urllib.request
        with urllib.request.urlopen(url + "api/summary", timeout=10) as r:
            assert json.load(r)["rows"] == 5
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "stopped" in out and "Traceback" not in err, (out, err)
    finally:
        if proc.poll() is None:
            proc.kill()


# ====================================================================== in a real browser


def browser_or_skip():
    """A headless Chromium WebDriver, or a skip (a failure when M2T_REQUIRE_BROWSER=1)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = (f"browser test needs {', '.join(missing)} (`make browser-deps` installs chromium and "
                  "chromium-driver; selenium is in the test extra)")
        if os.environ.get("M2T_REQUIRE_BROWSER") == "1":
            pytest.fail(f"M2T_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager never runs (nothing is downloaded).
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def test_missing_browser_skips_unless_required(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("M2T_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="make browser-deps"):
        browser_or_skip()
    monkeypatch.setenv("M2T_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="M2T_REQUIRE_BROWSER=1 but .*nonexistent/chromium"):
        browser_or_skip()


@pytest.fixture
def served(browser):
    server = B.make_server(browser, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield B.url_of(server)
    server.shutdown()
    server.server_close()


def test_page_in_headless_chromium(served, browser, archive):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser_or_skip()
    t0 = time.perf_counter()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(served)

        def tiles():
            return driver.find_elements(By.CSS_SELECTOR, "#grid .tile")

        def keys():
            return [t.get_attribute("data-key") for t in tiles()]

        wait.until(lambda d: len(tiles()) == 5)
        assert sorted(keys()) == sorted([*GOOD, BROKEN, "dup.png"])
        # Every ok tile gets its preview (keys with '/', a space, unicode in the URL), then ends
        # on the full decode scaled to the tile (here not scaled: 64x48).
        previews = "return [...document.querySelectorAll('.tile.status-ok img.preview')].map(i => i.naturalWidth)"
        wait.until(lambda d: d.execute_script(previews) == [W] * 3)
        full = ("return [...document.querySelectorAll('.tile.status-ok')].map(t => t.dataset.stage + ':' + "
                "(t.querySelector('img.full') ? t.querySelector('img.full').naturalWidth : 0))")
        wait.until(lambda d: d.execute_script(full) == [f"full:{W}"] * 3)
        # The pixels the tile shows are the full decode's (read back through a canvas).
        pixels = driver.execute_script(
            "const i = document.querySelector(`.tile[data-key='${arguments[0]}'] img.full`);"
            "const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;"
            "const g = c.getContext('2d'); g.drawImage(i, 0, 0);"
            "return Array.from(g.getImageData(0, 0, c.width, c.height).data);", GOOD[1])
        shown = np.array(pixels, dtype=np.uint8).reshape(H, W, 4)[..., :3]
        assert np.array_equal(shown, A.get_image(str(archive), GOOD[1]))
        # The error row: shown with its message and a placeholder, no image.
        bad = driver.find_element(By.CSS_SELECTOR, f'.tile[data-key="{BROKEN}"]')
        assert "status-error" in bad.get_attribute("class")
        message = bad.find_element(By.CSS_SELECTOR, ".err").text
        assert message and message == " ".join(browser.row_of(BROKEN)["error"].split())
        assert not bad.find_elements(By.TAG_NAME, "img")
        assert bad.find_element(By.CSS_SELECTOR, ".placeholder").is_displayed()
        # Click a tile: the full image in the lightbox, with its key and numbers.
        driver.find_element(By.CSS_SELECTOR, f'.tile.status-ok[data-key="{GOOD[0]}"]').click()
        wait.until(lambda d: d.execute_script("const i = document.getElementById('lb-img');"
                                              "return i.complete && !i.hidden ? i.naturalWidth : 0") == W)
        assert driver.find_element(By.ID, "lb-key").text == GOOD[0]
        assert "bpp" in driver.find_element(By.ID, "lb-meta").text
        assert "dB" in driver.find_element(By.ID, "lb-meta").text or "lossless" in driver.find_element(By.ID, "lb-meta").text
        driver.find_element(By.ID, "lb-close").click()
        wait.until(lambda d: not d.find_element(By.ID, "lightbox").is_displayed())
        # Filters by status.
        driver.find_element(By.CSS_SELECTOR, '#filters button[data-status="error"]').click()
        wait.until(lambda d: keys() == [BROKEN])
        assert driver.find_element(By.CSS_SELECTOR, ".tile .err").text == message
        driver.find_element(By.CSS_SELECTOR, '#filters button[data-status="duplicate"]').click()
        wait.until(lambda d: keys() == ["dup.png"])
        driver.find_element(By.CSS_SELECTOR, '#filters button[data-status="ok"]').click()
        wait.until(lambda d: sorted(keys()) == sorted(GOOD))
        # Key search (server side), combined with the status filter.
        driver.find_element(By.ID, "search").send_keys("été")
        wait.until(lambda d: keys() == [GOOD[0]])
        wait.until(lambda d: d.execute_script(previews) == [W])
        driver.find_element(By.CSS_SELECTOR, '#filters button[data-status="all"]').click()
        driver.find_element(By.ID, "search").clear()
        driver.find_element(By.ID, "search").send_keys("photos/")
        wait.until(lambda d: sorted(keys()) == sorted([GOOD[0], GOOD[1], BROKEN]))
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs
        # Decode failures (a server of its own: the browser caches the previews it got above):
        # the server's message in each tile, and in the lightbox.
        def broken(*args, **kwargs):
            raise A.ArchiveError("shard 00000: the bytes do not match the index")

        failing = B.make_server(B.Browser(str(archive), get_image=broken), "127.0.0.1", 0)
        threading.Thread(target=failing.serve_forever, daemon=True).start()
        try:
            driver.get(B.url_of(failing) + "?status=ok")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".tile .decode-error")) == 3)
            assert "do not match the index" in driver.find_element(By.CSS_SELECTOR, ".tile .decode-error").text
            driver.find_element(By.CSS_SELECTOR, f'.tile[data-key="{GOOD[1]}"]').click()
            wait.until(lambda d: "do not match the index" in d.find_element(By.ID, "lb-status").text)
        finally:
            failing.shutdown()
            failing.server_close()
    finally:
        driver.quit()
    print(f"browser test: {time.perf_counter() - t0:.1f} s in chromium")


# ----------------------------------------------------------------------------- partial reads


def test_a_preview_reads_one_prefix_of_the_stream(archive, monkeypatch):
    """`get_image(..., steps=K)` reads the stream once, only its first step_ends[K-1] bytes
    (the index carries them); K = S is the full image."""
    from m2t_core import bitstream as bs

    row = A.lookup(str(archive), GOOD[1])
    full = A.read_bitstream(str(archive), GOOD[1])
    header = bs.read_header(full)
    assert row["step_ends"] == list(header.step_ends) and row["step_ends"][-1] == row["length"]
    reads = []
    real_cat = type(A.Archive(str(archive)).fs).cat_file

    def recording_cat(self, path, start=None, end=None, **kw):
        if str(path).endswith(".bin"):
            reads.append((start, end))
        return real_cat(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(type(A.Archive(str(archive)).fs), "cat_file", recording_cat)
    for k in range(1, header.num_steps + 1):
        reads.clear()
        rgb = A.get_image(str(archive), GOOD[1], steps=k)
        assert reads == [(row["offset"], row["offset"] + header.step_ends[k - 1])], (k, reads)
        codec = m2t_core.load_model_for_header(header)
        assert np.array_equal(rgb, m2t_core.Decoder(codec).preview(full[:header.step_ends[k - 1]], steps=k).image)
    assert np.array_equal(rgb, A.get_image(str(archive), GOOD[1]))  # K = S: the full decode
    # An index without step_ends (written before the column existed): the header is read first.
    data = A.read_bitstream(str(archive), GOOD[1], steps=1)
    assert data == full[:header.step_ends[0]]
    reads.clear()
    row_without = {**row, "step_ends": None}
    arch = A.Archive(str(archive))
    assert A._prefix_length(arch, arch.shard_path(row["shard"], ".bin"), row_without, GOOD[1], 2) == header.step_ends[1]
    assert len(reads) == 1 and reads[0][0] == row["offset"]
    # The CLI: m2t get --preview K.
    out = archive.parent / "preview.png"
    assert m2t_main(["get", str(archive), GOOD[1], str(out), "--preview", "2"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), A.get_image(str(archive), GOOD[1], steps=2))
