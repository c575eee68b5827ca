// m2t browse: the page. Rows come from /api/rows a page at a time (loaded as the end of the
// grid scrolls into view). A tile on screen shows its preview (a prefix of the stream) first,
// then the full decode scaled to the tile (/thumb/); requests go two at a time, previews before
// full decodes, and a tile that leaves the screen is dropped from the queue (queued again when
// seen). The server decodes on a small pool and caches what it made.
"use strict";

const PAGE = 120;
const PARALLEL = 2;

const $ = (id) => document.getElementById(id);
const grid = $("grid"), more = $("more"), search = $("search");

const state = {
  status: "all", q: "", offset: 0, total: null, loading: false, gen: 0,
  abort: new AbortController(), queue: [], fullQueue: [], active: 0, summary: null,
};

// Keys may hold "/", spaces, "?", "#", "%", unicode: always one encoded path segment.
const keyUrl = (kind, key) => `${kind}/${encodeURIComponent(key)}.png`;

function fmtBytes(n) {
  if (n == null) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(2)} MB`;
}
function fmtPsnr(p) {
  if (p == null) return "";
  if (p === "inf") return "lossless";
  return `${Number(p).toFixed(2)} dB`;
}
function metaText(r) {
  const parts = [];
  if (r.bpp != null) parts.push(`${Number(r.bpp).toFixed(3)} bpp`);
  if (r.psnr != null) parts.push(fmtPsnr(r.psnr));
  if (r.length != null) parts.push(fmtBytes(r.length));
  else if (r.source_bytes != null) parts.push(`source ${fmtBytes(r.source_bytes)}`);
  if (r.width != null && r.height != null) parts.push(`${r.width}×${r.height}`);
  return parts.join(" · ");
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;  // never innerHTML: keys and messages are data
  return e;
}

async function errorText(res) {
  try {
    const body = await res.json();
    return body.error || `HTTP ${res.status}`;
  } catch (_) {
    return `HTTP ${res.status}`;
  }
}

// ------------------------------------------------------------------ the grid

function makeTile(r) {
  const tile = el("div", `tile status-${r.status}`);
  tile.dataset.key = r.key;
  tile.dataset.status = r.status;
  tile._row = r;
  tile._gen = state.gen;
  tile.dataset.stage = "none";  // then "preview", then "full" (the full decode, scaled to the tile)
  const thumb = el("div", "thumb");
  if (r.status === "ok") {
    thumb.append(el("div", "placeholder", "…"));
    tile.addEventListener("click", () => openLightbox(r));
    observer.observe(tile);
  } else if (r.status === "error") {
    thumb.append(el("div", "placeholder", "✕"));
    thumb.title = "not archived: no image";
  } else {
    thumb.append(el("div", "placeholder", r.status));
  }
  tile.append(thumb);
  const meta = el("div", "meta");
  const key = el("div", "key");
  key.append(el("span", `badge ${r.status}`, r.status), document.createTextNode(r.key));
  key.title = r.key;
  meta.append(key, el("div", "nums", metaText(r)));
  if (r.error) meta.append(el("div", "err", r.error));
  tile.append(meta);
  return tile;
}

const observer = new IntersectionObserver((entries) => {
  for (const e of entries) {
    const tile = e.target;
    tile._visible = e.isIntersecting;
    if (e.isIntersecting) enqueue(tile);
  }
  pump();
}, { rootMargin: "150px" });

function enqueue(tile) {
  if (tile._queued || tile._busy || tile._done) return;
  tile._queued = true;
  (tile.dataset.stage === "none" ? state.queue : state.fullQueue).push(tile);
}

function pump() {
  while (state.active < PARALLEL && (state.queue.length || state.fullQueue.length)) {
    const tile = (state.queue.length ? state.queue : state.fullQueue).shift();
    tile._queued = false;
    if (tile._gen !== state.gen || !tile.isConnected || tile._done) continue;
    if (!tile._visible) continue;  // scrolled away before its turn: queued again when seen
    loadStage(tile);
  }
}

// One stage of a tile: its preview, or (once the preview is up) its full decode.
async function loadStage(tile) {
  state.active++;
  tile._busy = true;
  const full = tile.dataset.stage === "preview";
  const thumb = tile.querySelector(".thumb");
  const gen = tile._gen;
  try {
    const res = await fetch(keyUrl(full ? "thumb" : "preview", tile.dataset.key), { signal: state.abort.signal });
    if (!res.ok) throw new Error(await errorText(res));
    const blob = await res.blob();
    if (gen !== state.gen) return;
    const img = el("img", full ? "preview full" : "preview");
    img.alt = tile.dataset.key;
    await new Promise((resolve) => {  // swapped in once decoded: no flash of an empty tile
      img.onload = img.onerror = resolve;
      img.src = URL.createObjectURL(blob);
    });
    URL.revokeObjectURL(img.src);
    if (gen !== state.gen) return;
    thumb.replaceChildren(img);
    tile.dataset.stage = full ? "full" : "preview";
    if (full) {
      tile._done = true;
      observer.unobserve(tile);
    }
  } catch (err) {
    if (err.name === "AbortError" || gen !== state.gen) return;
    tile._done = true;
    observer.unobserve(tile);
    thumb.title = err.message;
    if (!full) {
      thumb.classList.add("failed");
      thumb.replaceChildren(el("div", "placeholder", "preview failed"));
    }
    tile.querySelector(".meta").append(el("div", "err decode-error", (full ? "full decode failed: " : "") + err.message));
  } finally {
    tile._busy = false;
    if (gen === state.gen && !tile._done && tile._visible) enqueue(tile);  // next: the full decode
    if (gen === state.gen) {  // reset() zeroed the count of an older generation
      state.active--;
      pump();
    }
  }
}

async function loadPage() {
  if (state.loading || (state.total !== null && state.offset >= state.total)) return;
  state.loading = true;
  const gen = state.gen;
  more.textContent = "loading…";
  const params = new URLSearchParams({ offset: state.offset, limit: PAGE, status: state.status, q: state.q });
  try {
    const res = await fetch(`api/rows?${params}`, { signal: state.abort.signal });
    if (!res.ok) throw new Error(await errorText(res));
    const page = await res.json();
    if (gen !== state.gen) return;
    state.total = page.total;
    state.offset += page.rows.length;
    const frag = document.createDocumentFragment();
    for (const r of page.rows) frag.append(makeTile(r));
    grid.append(frag);
    showInfo();
  } catch (err) {
    if (err.name === "AbortError" || gen !== state.gen) return;
    more.textContent = `could not load rows: ${err.message}`;
    return;
  } finally {
    if (gen === state.gen) state.loading = false;
  }
  // The sentinel may still be on screen (a short page, a tall window): keep loading.
  const box = more.getBoundingClientRect();
  if (state.offset < state.total && box.top < window.innerHeight + 400) loadPage();
}

function showInfo() {
  const t = state.total;
  more.textContent = t === 0 ? "no rows match" : "";
  $("info").textContent = t === null ? "" :
    `${t} row${t === 1 ? "" : "s"} match · showing ${state.offset}` +
    (state.summary && state.summary.preview_steps != null
      ? ` · tiles: a preview of the first ${state.summary.preview_steps} coding steps, then the full decode`
      : " · tiles: full decodes");
}


function reset() {
  state.gen++;
  state.abort.abort();
  state.abort = new AbortController();
  state.queue = [];
  state.fullQueue = [];
  state.active = 0;
  state.offset = 0;
  state.total = null;
  state.loading = false;
  for (const tile of grid.children) observer.unobserve(tile);
  grid.replaceChildren();
  const params = new URLSearchParams();
  if (state.status !== "all") params.set("status", state.status);
  if (state.q) params.set("q", state.q);
  history.replaceState(null, "", params.toString() ? `?${params}` : location.pathname);
  loadPage();
}

function setStatus(status) {
  state.status = status;
  for (const b of document.querySelectorAll("#filters button")) {
    b.classList.toggle("active", b.dataset.status === status);
  }
}

// ------------------------------------------------------------------ the full image

function openLightbox(r) {
  const box = $("lightbox"), img = $("lb-img"), status = $("lb-status");
  const url = keyUrl("image", r.key);
  $("lb-key").textContent = r.key;
  $("lb-meta").textContent = metaText(r) + (r.shard ? ` · shard ${r.shard}` : "");
  $("lb-open").href = url;
  status.className = "lb-status";
  status.textContent = "decoding the full image…";
  img.removeAttribute("src");
  img.hidden = true;
  box.hidden = false;
  const token = (box._token = {});
  fetch(url).then(async (res) => {
    if (!res.ok) throw new Error(await errorText(res));
    const blob = await res.blob();
    if (box._token !== token) return;
    img.onload = () => { URL.revokeObjectURL(img.src); status.textContent = ""; img.hidden = false; };
    img.alt = r.key;
    img.src = URL.createObjectURL(blob);
  }).catch((err) => {
    if (box._token !== token) return;
    status.className = "lb-status failed";
    status.textContent = `decoding failed: ${err.message}`;
  });
}
function closeLightbox() {
  const box = $("lightbox");
  box._token = null;
  box.hidden = true;
}
$("lb-close").addEventListener("click", closeLightbox);
$("lightbox").addEventListener("click", (e) => { if (e.target === $("lightbox")) closeLightbox(); });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeLightbox(); });

// ------------------------------------------------------------------ controls

for (const b of document.querySelectorAll("#filters button")) {
  b.addEventListener("click", () => { setStatus(b.dataset.status); reset(); });
}
let typing = null;
search.addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { if (search.value !== state.q) { state.q = search.value; reset(); } }, 250);
});
$("listview").addEventListener("change", (e) => grid.classList.toggle("list", e.target.checked));

async function start() {
  const initial = new URLSearchParams(location.search);
  if (["ok", "error", "duplicate"].includes(initial.get("status"))) setStatus(initial.get("status"));
  state.q = search.value = initial.get("q") || "";
  try {
    const res = await fetch("api/summary");
    if (!res.ok) throw new Error(await errorText(res));
    const s = (state.summary = await res.json());
    $("archive").textContent = s.archive + (s.model ? ` · model ${s.model}` : "");
    document.title = `m2t browse · ${s.archive}`;
    for (const b of document.querySelectorAll("#filters button")) {
      const n = b.dataset.status === "all" ? s.rows : s.counts[b.dataset.status];
      b.querySelector(".count").textContent = n;
    }
    for (const w of s.warnings) $("warnings").append(el("div", null, `warning: ${w}`));
  } catch (err) {
    $("warnings").textContent = `could not read the archive's summary: ${err.message}`;
  }
  reset();
  // The end of the grid in view (or near it): the next page.
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadPage();
  }, { rootMargin: "400px" }).observe(more);
}
start();
