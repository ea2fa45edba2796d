"""``raydn smoke`` through the CLI dispatcher (tiny preset, synthetic frames)."""
from __future__ import annotations

import re

from raydn.cli import main


def test_smoke_default_runs_predict_and_a_training_step(capsys):
    assert main(["smoke"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("preset tiny_raydn:")
    frames = re.findall(r"predict frame (\d) \(prev_exists=(\d)\): +[\d.]+ ms, boxes (\d+)x9", out)
    assert frames == [("0", "0", "100"), ("1", "1", "100"), ("2", "1", "100")]
    assert "memory: embedding 1x64x64" in out and "torch.float64" in out
    m = re.search(r"train step: .* (\d+) loss terms, total ([\d.]+)", out)
    assert m and int(m.group(1)) == 4 * 3 + 5 and float(m.group(2)) > 0
    for key in ("loss_cls", "d1.dn_loss_bbox", "enc_loss_centers2d"):
        assert re.search(rf"^  {re.escape(key)} +[\d.]+$", out, re.M), key
    assert out.rstrip().endswith("smoke run OK")


def test_smoke_usage_errors(capsys):
    assert main(["smoke", "--preset", "nope", "--no-train"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["smoke", "--num-frames", "0"]) == 2
