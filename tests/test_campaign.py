"""pipeline/training/campaign.py: rounds of training that resume one run, each judged on val
by select_model, shipped only when it improves, logged. Tiny models on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _models import build_model
from m2t_core import registry
from m2t_core.config import load_model_config
from pipeline.training import campaign as C
from test_training import make_images

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "train" / "tiny-test.yaml"


@pytest.fixture
def setup(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    cfg = load_model_config(REPO / "configs" / "models" / "tiny-test.yaml")
    for name, scale in (("tiny-q1", 4), ("tiny-q2", 16), ("tiny-q3", 32)):
        registry.save_checkpoint(build_model(cfg, seed=0, model_id=name, init_scale=scale),
                                 weights / f"{name}.safetensors", name)
    monkeypatch.setenv("M2T_MODEL_PATH", str(weights))
    make_images(tmp_path / "train", 4)
    make_images(tmp_path / "val", 2, seed=3)
    return tmp_path, weights


def test_two_rounds_resume_one_run_and_log_each(setup):
    root, weights = setup
    before = (weights / "tiny-q2.safetensors").read_bytes()
    log = root / "models.md"
    log.write_text("# Models\n")
    argv = ["--config", str(TINY), "--set", f"train_data={root / 'train'}", "--set", "init_from=tiny-q2",
            "--set", "model_id=tiny-q2", "--set", "model=null", "--set", "val_images=0",
            "--out", str(root / "campaign"), "--round-steps", "3", "--rounds", "2",
            "--val", str(root / "val"), "--ladder", "tiny-q1,tiny-q2,tiny-q3", "--log", str(log), "--threads", "1",
            "--nice", "0"]
    assert C.main(argv) == 0
    run = root / "campaign" / "tiny-q2"
    rounds = [json.loads(line) for line in (run / "campaign.jsonl").read_text().splitlines()]
    assert [(r["from_step"], r["to_step"]) for r in rounds] == [(0, 3), (3, 6)]  # round 2 resumed round 1
    assert all(r["select_exit"] == 0 and r["select"]["candidate"]["model_id"] == "tiny-q2" for r in rounds)
    assert all(Path(r["candidate"]).is_file() for r in rounds)
    assert [r["select"]["candidate"]["info"]["steps"] for r in rounds] == [3, 6]
    assert log.read_text().count("| `tiny-q2` |") == 2
    assert not any(r["select"]["shipped"] for r in rounds)  # no --ship: nothing installed
    assert (weights / "tiny-q2.safetensors").read_bytes() == before


def test_ship_installs_only_an_improving_round(setup):
    root, weights = setup
    argv = ["--config", str(TINY), "--set", f"train_data={root / 'train'}", "--set", "init_from=tiny-q2",
            "--set", "model_id=tiny-q2", "--set", "model=null", "--set", "val_images=0", "--set", "lr=3e-3",
            "--out", str(root / "campaign"), "--round-steps", "4", "--rounds", "1", "--ship",
            "--val", str(root / "val"), "--ladder", "tiny-q1,tiny-q2,tiny-q3", "--threads", "1", "--nice", "0"]
    assert C.main(argv) == 0
    record = json.loads((root / "campaign" / "tiny-q2" / "campaign.jsonl").read_text())
    # Shipping installs the candidate's weights (its metadata gains the decision: `selected`).
    installed = registry.load_checkpoint(weights / "tiny-q2.safetensors").weights_hash()
    candidate = registry.load_checkpoint(record["candidate"]).weights_hash()
    assert record["select"]["shipped"] == record["select"]["ship"]
    assert (installed == candidate) == record["select"]["shipped"]
    assert ("selected" in registry.read_metadata(weights / "tiny-q2.safetensors")[2]) == record["select"]["shipped"]


def test_needs_a_stopping_rule(setup, capsys):
    with pytest.raises(SystemExit):
        C.main(["--config", str(TINY)])
    assert "--rounds or --hours" in capsys.readouterr().err
