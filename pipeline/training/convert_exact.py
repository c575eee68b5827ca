"""Convert a float-entropy-model checkpoint (bitstream format 1) into a portable one (format 2).

    python -m pipeline.training.convert_exact m2t-small-q3 out/m2t-small-q3.safetensors \
        --data ../shared/datasets/train --crops 768 --steps 300

What it does, with the transforms frozen (so the latents, and the distortion, do not change):
1. latents: g_a of `--crops` random 256x256 crops of the training images, rounded: one
   16x16-token window each for the small preset (computed once);
2. calibration: the exact model's activation exponents from the float model's maxima on a
   part of them (exact.ExactEntropyModel.calibrate);
3. quantisation-aware fine-tuning of the entropy model on the rate of those latents (M2T:
   the teacher-forced pass; MT: random masks as in training), through the integer grid
   (straight-through rounding, the integer path's tables and clamps);
4. export: the exact model's integers, the transforms, and the original float entropy
   weights as `legacy_entropy_model` (so format-1 streams of the model still decode where
   they did), fp16 for the float tensors. The model keeps its registry name.

It reports the rate of held-out latents under the float model and the exact one, before and
after fine-tuning. Never give it evaluation images (Kodak).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time

import numpy as np
import torch

from m2t_core import exact as X
from m2t_core import registry
from m2t_core.codec import M2TCodec, pad_latent, to_windows
from m2t_core.transformer import MixtureParams, mixture_likelihood

log = logging.getLogger("convert_exact")


def training_latents(model: M2TCodec, data: str, crops: int, crop_size: int, seed: int) -> torch.Tensor:
    """Rounded latents of random crops of the images under `data`, as windows (B, L, C)."""
    from pipeline.training.trainer import list_samples, random_crop, read_sample

    samples = list_samples(data)
    if not samples:
        raise SystemExit(f"no training images under {data}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples))
    windows, skipped = [], 0
    ww = model.cfg.window
    with torch.no_grad():
        for n in range(crops):
            sample = samples[order[n % len(samples)]]
            try:
                rgb = read_sample(sample)
            except Exception as exc:  # a bad file is skipped, named
                skipped += 1
                log.warning("skipping %s: %s", sample[0], exc)
                continue
            crop = random_crop(rgb, crop_size, rng)
            x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0
            y = torch.round(model.g_a(x))
            windows.append(to_windows(pad_latent(y, ww), ww))  # (nW, L, C)
            if (n + 1) % 100 == 0:
                log.info("latents: %d/%d crops", n + 1, crops)
    return torch.cat(windows)


def rate_bits(model: M2TCodec, tokens: torch.Tensor, quant: bool, seed: int = 0) -> torch.Tensor:
    """Total bits of `tokens` (B, L, C) under the entropy model: float or the exact grid."""
    cfg = model.cfg
    ops = X.FloatOps(model.exact, model.entropy_model, quant=quant)
    if cfg.mode == "m2t":
        params = MixtureParams(*X.m2t_teacher_forced(ops, tokens))
        lik = mixture_likelihood(tokens, params)
        return -torch.log2(lik).sum()
    gen = torch.Generator().manual_seed(seed)
    lo, hi = 0.05, 0.99
    ratio = torch.empty(tokens.shape[0], 1).uniform_(lo, hi, generator=gen)
    ranks = torch.rand(tokens.shape[:2], generator=gen).argsort(1).argsort(1)
    masked = ranks < (ratio * tokens.shape[1]).ceil()
    params = MixtureParams(*X.mt_forward(ops, tokens, masked))
    lik = mixture_likelihood(tokens, params)
    # Masked tokens only, scaled to the whole window (as in training).
    return -(torch.log2(lik) * masked[..., None]).sum() * (masked.numel() / masked.sum())


@torch.no_grad()
def exact_bits(model: M2TCodec, tokens: torch.Tensor, float_model=None) -> float:
    """Bits the coder pays for `tokens` (B, L, C) over the real coding schedule, M2T and MT
    alike (entropy_coding.estimate_bits): under the exact model's integer parameters, or,
    with `float_model` (an EntropyTransformer), under format 1's snapped float parameters."""
    from m2t_core.entropy_coding import estimate_bits, snap_integer, snap_params
    from m2t_core.transformer import DecodeState

    ops = X.CodingOps(model.exact)
    total = 0.0
    tok = tokens.to(torch.int64)
    for s in range(0, tok.shape[0], 32):
        chunk = tok[s:s + 32]
        state = DecodeState() if float_model is not None else X.ExactDecodeState()
        known = torch.zeros_like(chunk)
        for group in model.entropy_model.sched.groups:
            g = torch.as_tensor(group)
            keep = torch.ones(chunk.shape[0], len(group), dtype=torch.bool)
            values = chunk[:, g].reshape(-1).numpy()
            if float_model is not None:
                p = float_model.step(known.float(), state)
                K = p.means.shape[-1]
                snapped = snap_params(*(t[keep].reshape(-1, K) for t in (p.means, p.log_scales, p.logits)))
            else:
                flat = X.step(ops, known, state).flat(keep)
                snapped = snap_integer(flat.mean_q, flat.level, flat.logit_q)
            total += estimate_bits(values, snapped)
            known[:, g] = chunk[:, g]
    return total


def convert(source: str, data: str, crops: int, steps: int, lr: float, batch: int, seed: int,
            threads: int) -> tuple[M2TCodec, dict]:
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    model = registry.load_checkpoint(registry.find_model(source) if not source.endswith(".safetensors") else source)
    legacy = copy.deepcopy(model.legacy_entropy_model or model.entropy_model)
    t0 = time.time()
    tokens = training_latents(model, data, crops, 256, seed).float()
    held_out = tokens[: max(16, len(tokens) // 8)]
    train = tokens[len(held_out):]
    log.info("%d latent windows in %.0f s (%d held out)", len(tokens), time.time() - t0, len(held_out))
    model.calibrate_exact(train[:64])
    report = {"windows": len(tokens), "held_out": len(held_out)}
    with torch.no_grad():
        # The float model as format 1 codes it (snapped float parameters, the same schedule).
        report["float_bits"] = exact_bits(model, held_out, float_model=legacy.eval())
        report["qat_bits_before"] = float(rate_bits(model, held_out, quant=True))
        report["exact_bits_before"] = exact_bits(model, held_out)
    log.info("held-out bits: float %.0f, exact grid %.0f (coder estimate %.0f) before fine-tuning",
             report["float_bits"], report["qat_bits_before"], report["exact_bits_before"])
    calibrated = {k: v.clone() for k, v in model.exact.state_dict().items()}
    params = [p for p in model.entropy_model.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    model.entropy_model.train()
    t1 = time.time()
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.choice(len(train), size=min(batch, len(train)), replace=False))
        loss = rate_bits(model, train[idx], quant=True, seed=step) / train[idx].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 25 == 0 or step == steps:
            log.info("fine-tune step %d/%d: %.4f bits/symbol (%.1f s/step)", step, steps, float(loss.detach()),
                     (time.time() - t1) / step)
    model.entropy_model.eval()
    model.sync_exact()
    with torch.no_grad():
        report["qat_bits_after"] = float(rate_bits(model, held_out, quant=True))
        report["exact_bits_after"] = exact_bits(model, held_out)
    report["exact_vs_float_before_pct"] = 100 * (report["exact_bits_before"] / report["float_bits"] - 1)
    report["exact_vs_float_after_pct"] = 100 * (report["exact_bits_after"] / report["float_bits"] - 1)
    # Keep the fine-tuned integers only if they code the held-out latents in fewer bits.
    report["kept"] = "fine-tuned" if report["exact_bits_after"] < report["exact_bits_before"] else "calibrated"
    if report["kept"] == "calibrated":
        model.exact.load_state_dict(calibrated)
        model.exact.load_into(model.entropy_model)
        model.mark_exact_synced()
    report.update(steps=steps, lr=lr, batch=batch, crops=crops, data=data, seconds=round(time.time() - t0, 1),
                  exactness_margin_bits=round(model.exact.exactness_margin_bits(), 2))
    log.info("held-out bits after fine-tuning: exact %.0f (%+.2f %% vs float; before %+.2f %%); keeping the %s model",
             report["exact_bits_after"], report["exact_vs_float_after_pct"], report["exact_vs_float_before_pct"],
             report["kept"])
    model.legacy_entropy_model = legacy
    return model, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="registry name or checkpoint path of the float model")
    parser.add_argument("output", help="where to write the portable checkpoint (.safetensors)")
    parser.add_argument("--data", required=True, help="training images (folder/URL; never the evaluation set)")
    parser.add_argument("--crops", type=int, default=768, help="256x256 crops whose latents train the conversion")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (0: calibration only)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=16, help="windows per fine-tuning step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    model, report = convert(args.source, args.data, args.crops, args.steps, args.lr, args.batch, args.seed,
                            args.threads)
    _, _, info = registry.read_metadata(registry.find_model(args.source)
                                        if not args.source.endswith(".safetensors") else args.source)
    info = {**info, "exact_conversion": report}
    path = registry.save_checkpoint(model, args.output, model.model_id, info=info, dtype=torch.float16,
                                    float_entropy_model=False)
    print(json.dumps({"output": str(path), **report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
