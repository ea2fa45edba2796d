"""The run folder records its configuration (config.yaml) and the run repeats from it; a resume
compares the folder's configuration with the requested one (issue 17: `--resume auto` trusted the
folder). Demo / tiny presets on the synthetic world, 3-4 iterations, through the `raydn train` CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from raydn import __version__
from raydn.cli import main as cli_main
from raydn.engine.train import Trainer, TrainOptions

#: the README's ablation knobs (README, "Configuration and ablations") on the demo preset
ABLATION = ["--set", "head.denoising.ray.num_rays=7", "--set", "head.denoising.ray.alpha=4.0",
            "--set", "head.denoising.ray.beta=2.0", "--set", "head.denoising.ray.radius=2.0",
            "--set", "head.num_query=50"]


def _train(infos, out, *extra):
    return cli_main(["train", "--data", str(infos[1]["train"]), "--out", str(out), "--workers", "0",
                     "--device", "cpu", "--no-progress", "--log-interval", "1", *extra])


def _losses(out: Path) -> list[dict]:
    """Every logged loss of log.txt (the wall-clock ``time`` left out)."""
    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines() if l.startswith("{")]
    return [{k: v for k, v in l.items() if k != "time"} for l in lines]


def _folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ablation_run(synth_infos, tmp_path_factory):
    """A finished 3-iteration ablation run: --preset demo_raydn + --set of the ray-denoising knobs."""
    out = tmp_path_factory.mktemp("ablation") / "run"
    assert _train(synth_infos, out, "--preset", "demo_raydn", "--max-iters", "3", "--seed", "7",
                  *ABLATION) == 0
    return out


def test_config_yaml_records_the_run_and_repeats_it_bit_identically(synth_infos, ablation_run, tmp_path):
    rec = yaml.safe_load((ablation_run / "config.yaml").read_text())
    assert rec["preset"] == "demo_raydn" and rec["run"]["seed"] == 7 and rec["run"]["max_iters"] == 3
    assert rec["head"]["denoising"]["ray"] == dict(enabled=True, groups=1, num_rays=7, alpha=4.0, beta=2.0,
                                                   radius=2.0)
    assert rec["head"]["num_query"] == 50 and rec["train"]["lr"] == 2e-3   # preset value recorded too
    prov = rec["provenance"]
    assert prov["raydn_version"] == __version__ and prov["preset"] == "demo_raydn"
    assert prov["set"] == ABLATION[1::2] and prov["flags"] == {"run.seed": 7, "run.max_iters": 3}
    assert prov["data"] == str(synth_infos[1]["train"]) and prov["schedule"]["max_iters"] == 3
    assert "command" in prov
    ck = torch.load(ablation_run / "latest.pt", weights_only=True)
    assert ck["model"]["pts_bbox_head.reference_points.weight"].shape[0] == 50   # the override trained
    # the same run again from its config.yaml alone (no --preset, no --set, no --seed)
    again = tmp_path / "again"
    assert _train(synth_infos, again, "--config", str(ablation_run / "config.yaml")) == 0
    first, second = _losses(ablation_run), _losses(again)
    assert len(first) == 3 and first == second         # log.txt (5 decimals) ...
    ck2 = torch.load(again / "latest.pt", weights_only=True)
    assert json.loads(ck["history"]) == json.loads(ck2["history"])   # ... and the full-precision losses:
    for k, v in ck["model"].items():                                  # same machine, bit-identical
        assert torch.equal(v, ck2["model"][k]), k
    rec2 = yaml.safe_load((again / "config.yaml").read_text())
    assert {k: v for k, v in rec2.items() if k != "provenance"} == \
        {k: v for k, v in rec.items() if k != "provenance"}
    assert rec2["provenance"]["config_file"] == str(ablation_run / "config.yaml")


def test_resume_with_another_configuration_is_refused_before_loading(synth_infos, tmp_path, capsys):
    """--resume auto with other --set values, or another preset of the same shape family: exit 2,
    one line listing the differing keys; nothing in the folder is rewritten (config included)."""
    out = tmp_path / "run"
    Trainer(TrainOptions(preset="tiny_raydn", data=str(synth_infos[1]["train"]), out_dir=str(out),
                         max_iters=4, stop_after=2, seed=7, workers=0, log_interval=1, progress=False,
                         tensorboard=False, device="cpu")).run()
    before = _folder_bytes(out)
    assert {"config.yaml", "latest.pt", "log.txt"} <= set(before)
    capsys.readouterr()
    common = ("--max-iters", "4", "--seed", "7", "--resume", "auto")
    assert _train(synth_infos, out, "--preset", "tiny_raydn", "--set", "head.num_query=200", *common) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raydn train: error: --resume: {out / 'latest.pt'} records another configuration")
    assert "head.num_query: folder 100, requested 200" in err and "\n" not in err
    assert "Traceback" not in err and "size mismatch" not in err      # refused before load_state_dict
    # another preset with the same tensor shapes (it would load without an error): refused as well
    assert _train(synth_infos, out, "--preset", "tiny_repdetr3d", *common) == 2
    err = capsys.readouterr().err
    assert "preset: folder tiny_raydn, requested tiny_repdetr3d" in err
    assert "head.denoising.ray.enabled: folder true, requested false" in err
    assert _train(synth_infos, out, "--preset", "tiny_raydn", "--lr", "0.01", *common) == 2
    assert "train.lr: folder 0.002, requested 0.01" in capsys.readouterr().err
    assert _folder_bytes(out) == before                                 # nothing rewritten
    # the same configuration resumes; without --preset the folder's config.yaml is the request
    assert _train(synth_infos, out, "--resume", "auto") == 0
    assert [l["iter"] for l in _losses(out)] == [1, 2, 3, 4]
    assert (out / "config.yaml").read_bytes() == before["config.yaml"]  # the first start's record


def test_longer_max_iters_than_the_finished_run_is_refused_and_finished_says_so(synth_infos, ablation_run,
                                                                              tmp_path, capsys):
    import shutil
    out = tmp_path / "finished"
    shutil.copytree(ablation_run, out)
    before = _folder_bytes(out)
    capsys.readouterr()
    # a longer schedule on resume: never "silently trains nothing"
    assert _train(synth_infos, out, "--config", str(out / "config.yaml"), "--max-iters", "6",
                  "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "run.max_iters: folder 3, requested 6" in err and "keeps the schedule it was started with" in err
    assert _folder_bytes(out) == before
    # the finished run resumed as it was: says it is finished, trains nothing, rewrites nothing
    assert _train(synth_infos, out, "--resume", "auto") == 0
    text = capsys.readouterr().out
    assert "training already finished (iteration 3 of 3" in text
    assert _folder_bytes(out) == before
