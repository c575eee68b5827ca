#!/usr/bin/env python3
"""Codec speed benchmark (a benchmark, not a test): encode/decode time per image, M2T vs MT.

    python bench/codec_speed.py --quick        # 768x512 only, 2 repeats (~2 min on a 2-core CPU)
    python bench/codec_speed.py                # 768x512 and 2000x1500, 3 repeats
    python bench/codec_speed.py --stages --checkpoint m2t-small-q3 --sizes 768x512,1920x1080
                                               # per-stage times of the staged, batched coder (~3 min)

--stages times, per image, each stage the compression and verify jobs run (on --threads
threads, default one: as an actor with one CPU): g_a eager vs frozen (TorchScript; a CPU runs
g_a frozen: transforms.FROZEN_TRANSFORMS) and on a batch of --stage-batch images;
the entropy model's device stage (`Encoder.plan`) for one image and for a batch; range coding
(`code_plan`); decoding one latent (`Decoder.decode_latent`) and a batch
(`Decoder.decode_latents`); the integer g_s that decodes (alone and on a batch) next to the
float g_s of m2t 0.3 (eager and frozen); and `Encoder.encode_image`
(also with g_a eager, what M2T_EAGER_TRANSFORMS=1 runs) / `Decoder.decompress` end to end.
It writes bench/results/codec_stages.json (or --json).

What is measured, per schedule length S, image size and mode (same preset, same image, same
weights):
  * encode: `Encoder(model).encode_image(rgb)` (g_a, the exact entropy model's parameters,
    range coding);
  * decode: `Decoder(model).decompress(bitstream)` (the step loop: entropy model and range
    decoding, then g_s);
  * M2T only, decode without the key/value cache: the same stream, decoded the same way with
    every step run as `network.step(..., use_cache=False)` (each step re-runs all earlier
    slot groups instead of reading their cached keys/values). The exact entropy model gives
    the same integers either way, so the decoded image must equal the encoder's
    reconstruction: checked after every run, and the benchmark stops if it does not;
  * the time spent in (a) the transforms g_a / g_s (m2t_core.tiling's analysis / synthesis
    functions, frozen or eager), (b) the entropy network (network.step, m2t_teacher_forced
    and mt_forward in the exact model's arithmetic, output head included), (c) entropy
    coding (snap_integer + SymbolEncoder.encode/finish / SymbolDecoder.decode), and "other"
    (windowing, indexing, moving parameters to the CPU, checksums, bitstream packing).
    These are measured by wrapping those functions with timers for the duration of the
    benchmark (monkeypatching; everything is restored afterwards; a timed call made inside
    another counts once, in the outer one's phase).
Each figure is the median over --repeats runs, after one discarded warm-up run. Every decoded
image is compared with the encoder's reconstruction (`Encoder(model, reconstruct=True)`).
The runs of the different modes are interleaved, so a change of machine load affects all of
them alike.

The default model is the small preset (ModelConfig() = configs/models/m2t-small.yaml) with a
random initialisation (fixed seed); MT is the same config with mode="mt" and the same weights.
Speed does not depend on training except through the entropy-coding work, which depends on
the statistics of the latent and of the predicted distributions. --checkpoint loads trained
weights (registry name or path) instead; --other-checkpoint a trained model of the other mode.

Threads: --threads (default 1, as the jobs' actors run) sets torch's intra-op threads, which
everything runs on: the codec pins none (its entropy model is exact integer arithmetic, so
any thread count gives the same bytes). On a busy machine, one thread gives the steadiest
figures. See docs/benchmarks.md for results.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import m2t_core  # noqa: E402
from m2t_core import decoder as decoder_module  # noqa: E402
from m2t_core import encoder as encoder_module  # noqa: E402
from m2t_core import allocator, cpu_kernels  # noqa: E402
from m2t_core.allocator import keep_freed_memory  # noqa: E402
from m2t_core import int8_conv  # noqa: E402
from m2t_core import int8_linear  # noqa: E402
from m2t_core import model as model_module  # noqa: E402
from m2t_core import network as network_module  # noqa: E402
from m2t_core import tiling  # noqa: E402
from m2t_core.config import ModelConfig  # noqa: E402
from m2t_core.transforms import bf16_analysis  # noqa: E402
from m2t_core.decoder import Decoder  # noqa: E402
from m2t_core.encoder import Encoder, code_plan  # noqa: E402
from m2t_core.entropy_coding import SymbolDecoder, SymbolEncoder  # noqa: E402
from m2t_core.model import M2TCodec  # noqa: E402
from m2t_core.sysinfo import cpu_model  # noqa: E402
from bench._common import (  # noqa: E402  (shared with bench/peer_speed.py, bench/pipeline_speed.py)
    DEFAULT_DATA, LoadMeter, bench_image, load_avg, parse_size, write_report)

SEED = 0
PHASES = ("transforms", "transformer", "entropy_coding", "other")
DEFAULT_SIZES = "768x512,2000x1500"


# ------------------------------------------------------------------------------ timers


class PhaseTimer:
    """Accumulates wall time per phase; `sync` makes CUDA timings honest. Only the outermost
    timed call counts (mt_forward runs inside network.step; its time is counted once)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu_totals: dict[str, float] = defaultdict(float)
        self.depth = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        self.totals = defaultdict(float)
        self.cpu_totals = defaultdict(float)

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.depth:  # inside another timed call: counted there
                return fn(*args, **kwargs)
            self.sync()
            self.depth += 1
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.totals[phase] += time.perf_counter() - t0
                self.cpu_totals[phase] += time.process_time() - c0
                self.depth -= 1

        timed.__wrapped__ = fn
        return timed


@contextlib.contextmanager
def instrumented(timer: PhaseTimer):
    """Wrap the transforms, the entropy network and the entropy coder with timers. The codec
    calls all of them through module attributes (encoder.py and decoder.py import
    snap_integer by name: both are patched)."""
    undo: list[Callable[[], None]] = []

    def patch(owner, name: str, phase: str) -> None:
        if not hasattr(owner, name):
            raise RuntimeError(f"benchmark out of date: {owner!r} has no attribute {name!r}")
        original = owner.__dict__[name]
        setattr(owner, name, timer.wrap(phase, getattr(owner, name)))
        undo.append(lambda: setattr(owner, name, original))

    try:
        for name in ("analysis", "synthesis", "analysis_batch", "synthesis_batch"):
            patch(tiling, name, "transforms")
        for name in ("step", "m2t_teacher_forced", "mt_forward"):
            patch(network_module, name, "transformer")
        patch(encoder_module, "snap_integer", "entropy_coding")
        patch(decoder_module, "snap_integer", "entropy_coding")
        patch(SymbolEncoder, "encode", "entropy_coding")
        patch(SymbolEncoder, "finish", "entropy_coding")
        patch(SymbolDecoder, "decode", "entropy_coding")
        yield timer
    finally:
        for fn in reversed(undo):
            fn()


@contextlib.contextmanager
def kv_cache_off():
    """Every entropy-network step recomputes all slot groups so far instead of reading the
    key/value cache: network.step(..., use_cache=False), which coding.run_steps (the decoder's
    loop) calls through the module. Yields a one-element list counting the steps so run, so a
    caller can check that the patch was in effect."""
    cached_step = network_module.step
    calls = [0]

    def uncached_step(ops, tokens, state, use_cache: bool = True):  # the caller's use_cache is overridden
        calls[0] += 1
        return cached_step(ops, tokens, state, use_cache=False)

    network_module.step = uncached_step
    try:
        yield calls
    finally:
        network_module.step = cached_step


# ------------------------------------------------------------------------------ inputs


# parse_size, cover_resize, bench_image: bench/_common.py (shared with the other benchmarks)


# ------------------------------------------------------------------------------ models


def twin_of(model: M2TCodec, cfg: ModelConfig) -> M2TCodec:
    """A model of config `cfg` holding `model`'s weights (float entropy parameters and exact
    integers alike, so the exact model is not re-exported)."""
    twin = M2TCodec(cfg, model_id=model.model_id)
    twin.load_state_dict(model.state_dict())
    twin.mark_exact_synced()
    return twin.to(model.device).eval()


def with_steps(model: M2TCodec, num_steps: int | None) -> M2TCodec:
    """The same weights on a schedule of `num_steps` groups (the parameters do not depend on
    S; only the slot layout does). Speed only: a model trained for S = 12 codes worse at S = 4."""
    if num_steps is None or num_steps == model.cfg.num_steps:
        return model
    return twin_of(model, model.cfg.replace(num_steps=num_steps))


def build_models(checkpoint: str | None, device: torch.device,
                 other_checkpoint: str | None = None) -> tuple[dict[str, M2TCodec], str]:
    """{"m2t": model, "mt": model} and a description.

    Without checkpoints: one random init, both modes sharing its weights. With `checkpoint`:
    that model, and the other mode built from the same weights unless `other_checkpoint`
    gives a trained model of the other mode (e.g. m2t-small-q2 with mt-small-q2)."""
    if checkpoint:
        base = m2t_core.load_model(checkpoint, device=device, cache=False)
        desc = f"checkpoint {checkpoint!r} (model_id {base.model_id!r}, mode {base.cfg.mode})"
    else:
        torch.manual_seed(SEED)
        base = M2TCodec(ModelConfig()).to(device).eval()
        desc = (f"random init (torch.manual_seed({SEED})), small preset ModelConfig() = "
                f"configs/models/m2t-small.yaml; MT = same config with mode='mt', same weights")
    models = {base.cfg.mode: base}
    other_mode = "mt" if base.cfg.mode == "m2t" else "m2t"
    if other_checkpoint:
        other = m2t_core.load_model(other_checkpoint, device=device, cache=False)
        if other.cfg.mode != other_mode:
            raise SystemExit(f"--other-checkpoint must be a {other_mode} model, "
                             f"{other_checkpoint!r} is {other.cfg.mode}")
        models[other_mode] = other
        desc += f"; {other_mode}: checkpoint {other_checkpoint!r} (model_id {other.model_id!r})"
    else:
        models[other_mode] = twin_of(base, base.cfg.replace(mode=other_mode))
        if checkpoint:
            desc += f"; {other_mode} reuses its weights (speed only)"
    for m in models.values():
        m.to(device).eval()
    return models, desc


def transformer_flops(model: M2TCodec, num_windows: int) -> float:
    """Arithmetic operations (multiply-add = 2) of the entropy network's decoding schedule for
    `num_windows` windows, counted from the shapes: the linear layers and attention products
    (the exact model runs them as float64 products of integers). M2T (cached): slot group i
    feeds its m_i slots once and attends to all slots so far; MT: S full passes over the L
    positions, the output head on each step's own group (as the code does since m2t 0.5.2;
    0.5.1 ran it on every position)."""
    cfg, layout = model.cfg, model.layout
    D, L = cfg.d_model, cfg.tokens_per_window
    per_token_block = 2 * (4 * D * D + 2 * D * cfg.d_mlp)  # qkv + proj + MLP
    embed, head = 2 * cfg.C * D, 2 * D * cfg.C * 3 * cfg.n_mixtures
    flops = 0.0
    if cfg.mode == "m2t":
        for i in range(len(layout.sched.sizes)):
            m_i, seen = layout.slot_starts[i + 1] - layout.slot_starts[i], layout.slot_starts[i + 1]
            attention = 2 * 2 * m_i * seen * D  # q.k and weights.v
            flops += m_i * embed + cfg.n_layers * (m_i * per_token_block + attention) + layout.sched.sizes[i] * head
    else:
        attention = 2 * 2 * L * L * D
        flops = cfg.num_steps * (L * embed + cfg.n_layers * (L * per_token_block + attention)) + L * head
    return flops * num_windows


# ------------------------------------------------------------------------------ runs


def reconstruction(model: M2TCodec, rgb: np.ndarray, stream: bytes) -> np.ndarray:
    """The decoder's output as the encoder computes it (Encoder(reconstruct=True)), after
    checking that this encoder writes the same stream as the timed one."""
    enc = Encoder(model, reconstruct=True).encode_image(rgb)
    if enc.bitstream != stream:
        raise RuntimeError(f"{model.cfg.mode}: encoding the same image twice gave different streams")
    return enc.x_hat


def decode_nocache(decoder: Decoder, data: bytes) -> np.ndarray:
    """`decoder.decompress(data)` with the key/value cache off (kv_cache_off)."""
    with kv_cache_off() as steps:
        out = decoder.decompress(data)
    if not steps[0]:
        raise RuntimeError("decode_nocache: the decoder never called network.step: the cache-off "
                           "measurement would time the cached decoder (benchmark out of date)")
    return out


def timed(timer: PhaseTimer, fn: Callable, *args) -> tuple[float, dict[str, float], object]:
    """Wall time, phase times and the result of fn(*args). Phase keys: PHASES (wall time),
    "cpu" (process CPU time, all threads: less sensitive than wall time to other load) and
    "cpu_<phase>" (CPU time per phase)."""
    timer.reset()
    timer.sync()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    timer.sync()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    phases = {p: timer.totals.get(p, 0.0) for p in PHASES[:-1]}
    phases["other"] = max(0.0, total - sum(phases.values()))
    for p in PHASES[:-1]:
        phases["cpu_" + p] = timer.cpu_totals.get(p, 0.0)
    phases["cpu_other"] = max(0.0, cpu - sum(phases["cpu_" + p] for p in PHASES[:-1]))
    phases["cpu"] = cpu
    return total, phases, out


def summarize(runs: list[tuple[float, dict[str, float]]]) -> dict:
    totals = [t for t, _ in runs]
    med = statistics.median(totals)
    phase_med = {p: statistics.median(ph[p] for _, ph in runs) for p in PHASES}
    norm = sum(phase_med.values()) or 1.0
    cpu_med = {p: statistics.median(ph["cpu_" + p] for _, ph in runs) for p in PHASES}
    return {
        "median_s": med,
        "min_s": min(totals),
        "runs_s": totals,
        "cpu_median_s": statistics.median(ph["cpu"] for _, ph in runs),
        "phases_median_s": phase_med,
        "phase_share": {p: v / norm for p, v in phase_med.items()},
        "cpu_phases_median_s": cpu_med,
    }


def bench_size(models: dict[str, M2TCodec], rgb: np.ndarray, repeats: int, timer: PhaseTimer,
               log: Callable[[str], None]) -> dict:
    ops = [("m2t", "encode"), ("m2t", "decode"), ("m2t", "decode_nocache"), ("mt", "encode"), ("mt", "decode")]
    encoders = {mode: Encoder(model) for mode, model in models.items()}
    decoders = {mode: Decoder(model) for mode, model in models.items()}
    runs: dict[tuple[str, str], list] = {op: [] for op in ops}
    streams: dict[str, bytes] = {}
    info: dict[str, dict] = {}
    expected: dict[str, np.ndarray] = {}
    for r in range(repeats + 1):  # run 0 is the warm-up, discarded
        for mode, op in ops:
            if op == "encode":
                total, phases, out = timed(timer, encoders[mode].encode_image, rgb)
            elif op == "decode":
                total, phases, out = timed(timer, decoders[mode].decompress, streams[mode])
            else:
                total, phases, out = timed(timer, decode_nocache, decoders[mode], streams[mode])
            if op == "encode":
                streams[mode] = out.bitstream
                if r == 0:
                    y = out.y_hat
                    info[mode] = {"bytes": len(out.bitstream), "bpp": out.bpp,
                                  "latent_shape": list(y.shape),
                                  "latent_zero_fraction": float((y == 0).float().mean()),
                                  "latent_mean_abs": float(y.abs().float().mean())}
                    expected[mode] = reconstruction(models[mode], rgb, out.bitstream)
            elif not np.array_equal(out, expected[mode]):
                raise RuntimeError(f"{mode} {op}: decoded image differs from the encoder's reconstruction")
            if r > 0:
                runs[(mode, op)].append((total, phases))
            log(f"  {'warm-up' if r == 0 else f'run {r}/{repeats}'}: {mode:>3} {op:<14} {total:7.2f} s")
    result: dict = {}
    for mode, op in ops:
        result.setdefault(mode, dict(info[mode]))[op] = summarize(runs[(mode, op)])
    # Achieved entropy-network throughput while decoding (operations counted from the shapes).
    h, w = (math.ceil(v / 16) for v in rgb.shape[:2])
    ww = models["m2t"].cfg.window
    windows = math.ceil(h / ww) * math.ceil(w / ww)
    for mode in ("m2t", "mt"):
        flops = transformer_flops(models[mode], windows)
        seconds = result[mode]["decode"]["phases_median_s"]["transformer"]
        result[mode]["transformer_gflop"] = flops / 1e9
        result[mode]["transformer_gflops_per_s"] = flops / 1e9 / seconds if seconds else None
    m2t, mt = result["m2t"], result["mt"]
    result["speedup"] = {
        "decode_total": mt["decode"]["median_s"] / m2t["decode"]["median_s"],
        "decode_transformer_only": (mt["decode"]["phases_median_s"]["transformer"]
                                    / m2t["decode"]["phases_median_s"]["transformer"]),
        "decode_total_cpu": mt["decode"]["cpu_median_s"] / m2t["decode"]["cpu_median_s"],
        "decode_transformer_only_cpu": (mt["decode"]["cpu_phases_median_s"]["transformer"]
                                        / m2t["decode"]["cpu_phases_median_s"]["transformer"]),
        "encode_total": mt["encode"]["median_s"] / m2t["encode"]["median_s"],
        "encode_transformer_only": (mt["encode"]["phases_median_s"]["transformer"]
                                    / m2t["encode"]["phases_median_s"]["transformer"]),
        "m2t_cache_off_over_on": m2t["decode_nocache"]["median_s"] / m2t["decode"]["median_s"],
        "m2t_cache_off_over_on_transformer": (m2t["decode_nocache"]["phases_median_s"]["transformer"]
                                              / m2t["decode"]["phases_median_s"]["transformer"]),
    }
    return result


# ------------------------------------------------------------------------------ report


def machine_info(device: torch.device) -> dict:
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "constriction": version("constriction"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "int8_conv": int8_conv.status() if device.type == "cpu" else "off (GPU: the float32 route)",
        "int8_linear": int8_linear.status() if device.type == "cpu" else "off (GPU: the float64 route)",
        "cpu_kernels": cpu_kernels.threads(),
        "malloc": allocator.state(),
        "analysis": ("bf16" if bf16_analysis() else "float32") if device.type == "cpu" else "float32",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# busy_cpu_seconds, LoadMeter, load_avg: bench/_common.py


def fmt_table(results: dict, steps: int) -> str:
    head = (f"{'S':>2} {'size':<10} {'mode':<4} {'op':<17} {'median s':>9} {'min s':>7} {'cpu s':>7} "
            f"{'transforms':>11} {'transformer':>12} "
            f"{'entropy cod.':>13} {'other':>7} {'bpp':>7}")
    lines = [head, "-" * len(head)]
    for size, res in results.items():
        for mode in ("m2t", "mt"):
            for op in ("encode", "decode", "decode_nocache"):
                if op not in res[mode]:
                    continue
                r = res[mode][op]
                sh = r["phase_share"]
                label = "decode (no cache)" if op == "decode_nocache" else op
                lines.append(
                    f"{steps:>2} {size:<10} {mode:<4} {label:<17} {r['median_s']:>9.3f} {r['min_s']:>7.2f} "
                    f"{r['cpu_median_s']:>7.2f} {sh['transforms']:>11.0%} "
                    f"{sh['transformer']:>12.0%} {sh['entropy_coding']:>13.0%} {sh['other']:>7.0%} "
                    f"{res[mode]['bpp']:>7.3f}"
                )
    return "\n".join(lines)


def encode_with_eager_g_a(encoder: Encoder, rgb: np.ndarray):
    """encode_image as it runs with M2T_EAGER_TRANSFORMS=1 (the module global it sets, which
    M2TCodec reads when it picks how g_a runs)."""
    before = model_module.CPU_TRANSFORMS
    model_module.CPU_TRANSFORMS = "eager"
    try:
        return encoder.encode_image(rgb)
    finally:
        model_module.CPU_TRANSFORMS = before


def without_int8_route(work: Callable) -> Callable:
    """`work` with the integer g_s on its float32 route only (M2T_INT8_CONV=0, as m2t 0.5
    ran): the same pixels, for a before/after in one run."""
    def run():
        before = os.environ.get("M2T_INT8_CONV")
        os.environ["M2T_INT8_CONV"] = "0"
        try:
            return work()
        finally:
            if before is None:
                del os.environ["M2T_INT8_CONV"]
            else:
                os.environ["M2T_INT8_CONV"] = before
    return run


def bench_stages(model: M2TCodec, rgb: np.ndarray, batch: int, repeats: int, log) -> dict:
    """Median seconds per image of each stage of staged coding (see the module docstring)."""
    from m2t_core.transforms import frozen_for_inference

    frozen_g_s = frozen_for_inference(model.g_s, model.cfg.C)
    encoder, decoder = Encoder(model), Decoder(model)
    batch_encoder, batch_decoder = Encoder(model, batch_images=batch), Decoder(model, batch_images=batch)

    rgbs = [rgb, rgb[:, ::-1], rgb[::-1], rgb[::-1, ::-1]] * (batch // 4 + 1)
    rgbs = [np.ascontiguousarray(r) for r in rgbs[:batch]]  # same size, different content
    H, W = rgb.shape[:2]
    x = torch.from_numpy(rgbs[0].copy()).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    with torch.inference_mode():
        ys = model.analysis_batch(rgbs, batch=1)
        latents = [(y, H, W) for y in ys]
        plan = encoder.plan(latents[:1])[0]
        stream = code_plan(plan).bitstream
        streams = [code_plan(p).bitstream for p in batch_encoder.plan(latents)]
    stages: dict[str, tuple[Callable, int]] = {  # name -> (work, images it covers)
        "g_a eager": (lambda: tiling.analysis(model.g_a, x), 1),
        "g_a frozen": (lambda: model.analysis(rgbs[0]), 1),
        f"g_a frozen, batch {batch}": (lambda: model.analysis_batch(rgbs, batch=batch), batch),
        "entropy model plan, 1 image": (lambda: encoder.plan(latents[:1]), 1),
        f"entropy model plan, batch {batch}": (lambda: batch_encoder.plan(latents), batch),
        "range coding (code_plan)": (lambda: code_plan(plan), 1),
        "decode_latent": (lambda: decoder.decode_latent(stream), 1),
        f"decode_latents, batch {batch}": (lambda: batch_decoder.decode_latents(streams), batch),
        # The codec decodes with the integer g_s (m2t_core/int_synthesis.py); the float g_s
        # (eager and frozen) is what m2t 0.3 ran, measured for comparison.
        "g_s integer": (lambda: model.synthesis(ys[0], H, W), 1),
        "g_s integer, float32 route (m2t 0.5)": (without_int8_route(lambda: model.synthesis(ys[0], H, W)), 1),
        f"g_s integer, batch {batch}": (lambda: model.synthesis_batch(latents, batch=batch), batch),
        "g_s float eager (m2t 0.3)": (lambda: tiling.synthesis(model.g_s, ys[0][None].float(), H, W), 1),
        "g_s float frozen": (lambda: tiling.synthesis(model.g_s, ys[0][None].float(), H, W, run=frozen_g_s), 1),
        "encode_image (end to end)": (lambda: encoder.encode_image(rgbs[0]), 1),
        "encode_image, g_a eager (M2T_EAGER_TRANSFORMS=1)": (lambda: encode_with_eager_g_a(encoder, rgbs[0]), 1),
        "decompress (end to end)": (lambda: decoder.decompress(stream), 1),
        "decompress, float32 route g_s (m2t 0.5)": (without_int8_route(lambda: decoder.decompress(stream)), 1),
    }
    out = {}
    with torch.inference_mode():
        for name, (work, n) in stages.items():
            work()  # warm-up (the frozen transforms are built on first use)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                work()
                times.append((time.perf_counter() - t0) / n)
            out[name] = {"median_s_per_image": statistics.median(times), "runs_s_per_image": times}
            log(f"  {name:<42} {out[name]['median_s_per_image']:.3f} s per image")
    return out


def main_stages(args, log) -> int:
    sizes = [parse_size(s) for s in (args.sizes or "768x512").split(",")]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    if args.checkpoint:
        model = m2t_core.load_model(args.checkpoint, device=args.device, cache=False)
        desc = f"checkpoint {args.checkpoint!r} (model_id {model.model_id!r}, mode {model.cfg.mode})"
    else:
        models, desc = build_models(None, torch.device(args.device))
        model = models["m2t"]
    machine = machine_info(torch.device(args.device))
    log(f"machine: {machine['cpu']}, torch {machine['torch']}, {torch.get_num_threads()} torch threads; model {desc}; "
        f"transforms {model.transforms_implementation()}")
    results, images = {}, {}
    meter = LoadMeter()
    for size in sizes:
        key = f"{size[0]}x{size[1]}"
        rgb, images[key] = bench_image(size, args.data_root)
        log(f"{key} ({images[key]}), median of {repeats}:")
        results[key] = bench_stages(model, rgb, args.stage_batch, repeats, log)
    report = {"benchmark": "codec_stages",
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "machine": machine,
              "model": desc, "transforms": model.transforms_implementation(), "batch": args.stage_batch,
              "repeats": repeats, "images": images, "results": results, "load_average_after": load_avg(),
              "other_processes_cores": meter.other_cores()}
    write_report(args.json or REPO / "bench" / "results" / "codec_stages.json", report)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Encode/decode speed of the M2T vs MT codec (median of repeats).")
    ap.add_argument("--quick", action="store_true", help="768x512 only, 2 repeats (~2 min on a 2-core CPU)")
    ap.add_argument("--sizes", type=str, default=None,
                    help=f"comma-separated WxH sizes (default {DEFAULT_SIZES}; --quick and --stages: 768x512)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 3; --quick: 2)")
    ap.add_argument("--steps", type=str, default="4,8,12",
                    help="comma-separated schedule lengths S to time (default 4,8,12; the models' own "
                         "weights on each schedule)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads, which all the codec's work runs on (default 1, as the jobs' "
                         "actors run)")
    ap.add_argument("--checkpoint", default=None,
                    help="registry name or checkpoint path (default: random init, fixed seed)")
    ap.add_argument("--other-checkpoint", default=None,
                    help="a trained model of the other mode (e.g. --checkpoint m2t-small-q2 "
                         "--other-checkpoint mt-small-q2); default: the other mode reuses --checkpoint's weights")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA,
                    help="datasets folder (kodak/, train/debian-wallpapers/); default ../shared/datasets")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write results (default bench/results/codec_speed.json, "
                         "--quick: bench/results/codec_speed_quick.json, --stages: bench/results/codec_stages.json)")
    ap.add_argument("--stages", action="store_true",
                    help="only the per-stage times of staged, batched coding (M2T; see the module docstring)")
    ap.add_argument("--stage-batch", type=int, default=4, help="--stages: the batch (default 4)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the m2t commands and the jobs' workers do
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    if args.stages:
        if args.stage_batch < 1 or (args.repeats is not None and args.repeats < 1):
            ap.error("--stage-batch and --repeats must be >= 1")
        return main_stages(args, lambda msg: print(msg, flush=True))

    sizes = [parse_size(s) for s in (args.sizes or ("768x512" if args.quick else DEFAULT_SIZES)).split(",")]
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    try:
        step_counts = [int(v) for v in args.steps.split(",")]
    except ValueError:
        ap.error("--steps takes comma-separated integers")
    if any(s < 1 for s in step_counts):
        ap.error("--steps must be >= 1")
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    json_path = args.json or REPO / "bench" / "results" / (
        "codec_speed_quick.json" if args.quick else "codec_speed.json")
    device = torch.device(args.device)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.other_checkpoint and not args.checkpoint:
        ap.error("--other-checkpoint needs --checkpoint")
    models, model_desc = build_models(args.checkpoint, device, args.other_checkpoint)
    cfg = models["m2t"].cfg
    machine = machine_info(device)
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"{machine['torch_threads']} torch threads, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else ""))
    log(f"model:   {model_desc}")
    log(f"         S={cfg.num_steps} steps, window {cfg.window}x{cfg.window} tokens, d_model {cfg.d_model}, "
        f"{cfg.n_layers} layers, {sum(p.numel() for p in models['m2t'].parameters()) / 1e6:.2f} M parameters")
    log(f"timing:  median of {repeats} run(s) after 1 warm-up; load average before: {load_avg()}")

    timer = PhaseTimer(device)
    results: dict[str, dict[str, dict]] = {}  # "S=12" -> "768x512" -> figures
    images: dict[str, str] = {}
    rgbs = {}
    for size in sizes:
        key = f"{size[0]}x{size[1]}"
        rgbs[key], images[key] = bench_image(size, args.data_root)
        log(f"{key}: {images[key]}")
    t_start = time.perf_counter()
    overall = LoadMeter()
    with instrumented(timer):
        for steps in step_counts:
            pair = {mode: with_steps(m, steps) for mode, m in models.items()}
            for key, rgb in rgbs.items():
                log(f"S={steps}, {key}:")
                meter = LoadMeter()
                res = results.setdefault(f"S={steps}", {})[key] = bench_size(pair, rgb, repeats, timer, log)
                res["other_processes_cores"] = meter.other_cores()
                if res["other_processes_cores"] is not None:
                    log(f"  other processes kept {res['other_processes_cores']:.2f} of "
                        f"{os.cpu_count()} cores busy on average")
    elapsed = time.perf_counter() - t_start
    other_cores = overall.other_cores()
    # Wall times suffer once the other processes leave fewer free cores than we use.
    used = machine["torch_threads"]
    contended = other_cores is not None and other_cores > max(0.25, (os.cpu_count() or 1) - used)

    log("")
    log("\n".join(fmt_table(res, int(label[2:])) for label, res in results.items()))
    log("(median/min: wall time; cpu s: median process CPU time, all threads; shares: median wall time\n"
        " per phase / sum of the phase medians; transformer = the entropy network; entropy cod. =\n"
        " snap_integer + range coder)")
    log("")
    for label, by_size in results.items():
        for key, res in by_size.items():
            sp = res["speedup"]
            log(f"{label} {key}: m2t/mt decode speedup {sp['decode_total']:.2f}x total, "
                f"{sp['decode_transformer_only']:.2f}x transformer-only "
                f"[by CPU time: {sp['decode_total_cpu']:.2f}x, {sp['decode_transformer_only_cpu']:.2f}x]; "
                f"encode {sp['encode_total']:.2f}x total, {sp['encode_transformer_only']:.2f}x transformer-only; "
                f"m2t decode time cache off/on {sp['m2t_cache_off_over_on']:.2f}x "
                f"({sp['m2t_cache_off_over_on_transformer']:.2f}x transformer-only); "
                f"transformer {res['m2t']['transformer_gflop']:.2f} / {res['mt']['transformer_gflop']:.2f} GFLOP "
                f"at {res['m2t']['transformer_gflops_per_s']:.1f} / {res['mt']['transformer_gflops_per_s']:.1f} "
                f"GFLOP/s (M2T / MT)")
    log(f"benchmark took {elapsed:.0f} s; load average after: {load_avg()}"
        + (f"; other processes kept {other_cores:.2f} of {os.cpu_count()} cores busy on average"
           + (" (wall times are inflated by that)" if contended else "")
           if other_cores is not None else ""))

    report = {
        "benchmark": "codec_speed",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": machine,
        "model": {"description": model_desc, "checkpoint": args.checkpoint,
                  "other_checkpoint": args.other_checkpoint, "config": cfg.to_dict(),
                  "random_init_seed": None if args.checkpoint else SEED},
        "repeats": repeats,
        "warmup_runs": 1,
        "load_average_after": load_avg(),
        "elapsed_s": elapsed,
        "other_processes_cores": other_cores,
        "wall_times_contended": contended,
        "images": images,
        "steps": step_counts,
        "results": results,
    }
    if contended:
        log(f"WARNING: other processes used {other_cores:.2f} cores during the benchmark: wall times are "
            f"inflated" + (" (with several torch threads a busy CPU can slow the many small M2T steps by "
                           "10x or more; re-run on an idle machine, or with --threads 1)"
                           if used > 1
                           else "; the cpu s column is less affected"))
    write_report(json_path, report)
    # The headline: the preset's own S (12), the first size.
    headline = results[f"S={cfg.num_steps}"] if f"S={cfg.num_steps}" in results else results[next(iter(results))]
    log(f"m2t/mt decode speedup: {headline[next(iter(headline))]['speedup']['decode_total']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
