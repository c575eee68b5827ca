"""A training campaign that lasts across runs: train in rounds for as long as the machine is
free, and after every round ship the candidate only if it codes `val` better.

    python -m pipeline.training.campaign --config configs/train/m2t-small-cpu.yaml --hours 8 --ship \\
        --log docs/models.md                                   # in the background: nohup ... &
    python -m pipeline.training.campaign --config ... --rounds 1 --round-steps 400   # one short round

The first round warm-starts from the config's init_from (the shipped checkpoint; the
optimizer's moments start from zero and its lr re-warms over warmup_steps). Every later
round, in this invocation or a later one, resumes the same run (weights, optimizer and step
from <out>/<model_id>/last-*), extending `steps` by --round-steps, so the lr schedule's
decay (lr / 10 for the last 10 % of the steps) and the quantisation-aware phase (qat_from)
end every round: each candidate is an annealed, exactly-calibrated export. Interrupting a
round loses at most checkpoint_every steps (the next invocation resumes it). The campaign runs
at a lowered CPU priority (--nice), so other work on the machine takes the cores first.

After a round, pipeline.training.select_model codes val with real bitstreams, computes the
ladder's BD-rate with the candidate in place of the model it would replace, ships it (with
--ship) only if that improves, and logs the round (with --log) in docs/models.md. Every
round is also a line of <out>/<model_id>/campaign.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from m2t_core.config import ConfigError
from pipeline.training import select_model
from pipeline.training import trainer as T
from pipeline.training.checkpoints import has_state, saved_step

log = logging.getLogger(__name__)


def run_round(args, run_dir: Path, round_steps: int) -> dict:
    """Train one more round, then judge its export on val; returns the round's record."""
    start = saved_step(run_dir)
    target = start + round_steps
    cfg = T.load_config(args.config, args.overrides + [f"steps={target}", f"output_dir={run_dir}"])
    t0 = time.time()
    export = T.train(cfg, resume=has_state(run_dir))
    candidates = run_dir / "candidates"
    candidates.mkdir(exist_ok=True)
    candidate = candidates / f"{cfg.model_id}-step{target}.safetensors"
    shutil.copyfile(export, candidate)  # the export is overwritten by the next round
    verdict = run_dir / "candidates" / f"{candidate.stem}.select.json"
    select_args = [str(candidate), "--val", args.val, "--json", str(verdict), "--threads", str(args.threads)]
    select_args += ["--ladder", args.ladder] if args.ladder else []
    select_args += ["--kodak", args.kodak] if args.kodak else []
    select_args += ["--log", args.log] if args.log else []
    select_args += ["--ship"] if args.ship else []
    code = select_model.main(select_args)
    result = json.loads(verdict.read_text()) if verdict.is_file() else {}
    record = {"kind": "round", "from_step": start, "to_step": target, "train_s": round(time.time() - t0, 1),
              "candidate": str(candidate), "select_exit": code, "select": result}
    with (run_dir / "campaign.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.training.campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/train/m2t-small-cpu.yaml", help="training config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (as m2t train --set); steps and output_dir are the campaign's")
    parser.add_argument("--out", default="runs/campaign", help="campaign folder (a run per model_id inside)")
    parser.add_argument("--round-steps", type=int, default=0, help="steps per round (default: the config's steps)")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (0: use --hours)")
    parser.add_argument("--hours", type=float, default=0.0, help="start no new round after this many hours")
    parser.add_argument("--val", default="../shared/datasets/val", help="held-out images that decide shipping")
    parser.add_argument("--kodak", default="", help="also report Kodak BD-rate in the log (never decides)")
    parser.add_argument("--ladder", default="", help="select_model --ladder (default: its own)")
    parser.add_argument("--ship", action="store_true", help="install a candidate that improves on val")
    parser.add_argument("--log", default="", help="markdown file whose campaign log gets a row per round")
    parser.add_argument("--threads", type=int, default=0, help="threads for the val coding (0: all cores)")
    parser.add_argument("--nice", type=int, default=10,
                        help="lower this process's CPU priority by N (default 10): other work on the machine goes first")
    args = parser.parse_args(argv)
    T._setup_logging()
    if args.rounds <= 0 and args.hours <= 0:
        parser.error("give --rounds or --hours (the campaign must know when to stop)")
    if args.nice > 0 and hasattr(os, "nice"):
        os.nice(args.nice)  # "as long as the machine is free": a background campaign yields the cores
    try:
        cfg = T.load_config(args.config, args.overrides)
        round_steps = args.round_steps or cfg.steps
        if round_steps <= 0:
            raise ConfigError(f"--round-steps must be positive, got {round_steps}")
        run_dir = Path(args.out).expanduser().resolve() / cfg.model_id
        run_dir.mkdir(parents=True, exist_ok=True)
        args.threads = args.threads or T.torch.get_num_threads()
        t0, done = time.time(), 0
        while True:
            record = run_round(args, run_dir, round_steps)
            done += 1
            select = record["select"]
            log.info("round %d: steps %d..%d in %.0f s; val BD-rate %s; %s (%s)", done, record["from_step"],
                     record["to_step"], record["train_s"], (select.get("val") or {}).get("bd_rate", {}).get("value"),
                     "shipped" if select.get("shipped") else "would ship (no --ship)" if select.get("ship")
                     else "not shipped", select.get("reason", "select failed"))
            if (args.rounds and done >= args.rounds) or (args.hours and time.time() - t0 >= args.hours * 3600):
                break
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
