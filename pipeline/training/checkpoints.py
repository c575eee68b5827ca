"""Training state on disk: the resumable checkpoint of a run (weights, optimizer moments, step)
and weight copying between models. No file is ever unpickled; every write goes to a
temporary file first (os.replace).

  last.safetensors          model weights (fp32), an m2t checkpoint
  last-optim.safetensors    AdamW state tensors, keys "<param index>.<name>"
  last-state.json           step, wall time, seed, optimizer hyper-parameters
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m2t_core import registry
from m2t_core import M2TCodec

if TYPE_CHECKING:
    from pipeline.training.trainer import TrainConfig


RATE_KEYS = frozenset({"entropy_model.log2_gain", "entropy_model.rate_embed",  # a variable-rate model's own
                       "exact.rate_log2_gain", "exact.rate_embed"})


def copy_weights(model: M2TCodec, source: M2TCodec) -> None:
    """Load `source`'s transforms, float entropy parameters and exact model into `model`. A
    variable-rate model may start from a fixed-rate one of the same architecture (a warm
    start): its gains and rate embeddings keep their initial values."""
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected or set(missing) - RATE_KEYS or (missing and source.rate_levels):
        raise ValueError(f"cannot start {model.model_id!r} from {source.model_id!r}: the architectures differ "
                         f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    if missing:  # the integers of the new rate tables follow their floats
        model.exact.export_from(model.entropy_model)
    model.mark_exact_synced()


def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def has_state(out_dir: Path) -> bool:
    return (out_dir / "last-state.json").is_file()


def saved_step(out_dir: Path) -> int:
    """The step of the training state in out_dir (0 when there is none)."""
    return json.loads((out_dir / "last-state.json").read_text())["step"] if has_state(out_dir) else 0


def save_state(out_dir: Path, model: M2TCodec, optimizer: torch.optim.Optimizer, step: int,
               elapsed_s: float, cfg: "TrainConfig") -> None:
    """Weights + optimizer tensors + a JSON of scalars; the JSON is written last and names
    the step, so a crash between the writes is detected on resume."""
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{name}": t.detach().to("cpu").contiguous()
               for pid, state in opt["state"].items() for name, t in state.items() if torch.is_tensor(t)}
    atomic_write(out_dir / "last-optim.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))
    registry.save_checkpoint(model, out_dir / "last.safetensors", cfg.model_id,
                             info={"step": step, "training_state": True}, dtype=torch.float32)
    state = {"step": step, "elapsed_s": elapsed_s, "seed": cfg.seed, "model_id": cfg.model_id,
             "param_groups": opt["param_groups"]}
    atomic_write(out_dir / "last-state.json", lambda p: p.write_text(json.dumps(state, indent=1)))


def load_state(out_dir: Path, model: M2TCodec, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Restore weights and optimizer state; returns (step, elapsed seconds)."""
    state = json.loads((out_dir / "last-state.json").read_text())
    step = int(state["step"])
    weights_step = registry.read_metadata(out_dir / "last.safetensors")[2].get("step")
    tensors = load_file(str(out_dir / "last-optim.safetensors"))
    with safe_open(str(out_dir / "last-optim.safetensors"), framework="pt") as f:
        optim_step = int((f.metadata() or {}).get("step", -1))
    if weights_step != step or optim_step != step:
        raise RuntimeError(f"{out_dir}: checkpoint files disagree (state step {step}, weights {weights_step}, "
                           f"optimizer {optim_step}): the last save was interrupted")
    copy_weights(model, registry.load_checkpoint(out_dir / "last.safetensors"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = t
    # Hyper-parameters come from the current config (lr is set every step); only the moments
    # are restored, so a GPU state resumes on a CPU and vice versa.
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
    return step, float(state.get("elapsed_s", 0.0))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))

