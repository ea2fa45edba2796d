"""One name per concept on the command line (issue 18, item 4): deprecated aliases, the shared
``--device`` / ``--trust-checkpoint`` options, ``raydn train`` without a preset, and the README's
command-line reference generated from the parsers."""
from __future__ import annotations

import argparse
import fractions
import json
from pathlib import Path

import pytest
import torch

from raydn.cli import build_parser, main
from raydn.commands._args import deprecated_aliases, resolve_device
from raydn.commands._reference import command_parsers, flag_tables, readme_block
from raydn.errors import RaydnError

README = Path(__file__).resolve().parents[1] / "README.md"

#: (command, argv every parse needs, old spelling + value, new spelling + value)
ALIASES = [
    ("infer", ["--out", "d.jsonl"], ["--infos", "v.pkl"], ["--data", "v.pkl"]),
    ("infer", ["--out", "d.jsonl"], ["--frames", "imgs"], ["--images", "imgs"]),
    ("demo", [], ["--iters", "7"], ["--max-iters", "7"]),
    ("demo", [], ["--minutes", "3.5"], ["--time-budget", "3.5"]),
    ("demo", [], ["--frames", "2"], ["--num-frames", "2"]),
    ("smoke", [], ["--frames", "5"], ["--num-frames", "5"]),
]


@pytest.mark.parametrize("cmd,base,old,new", ALIASES, ids=[f"{a[0]}{a[2][0]}" for a in ALIASES])
def test_deprecated_alias_parses_like_the_new_spelling_and_warns(cmd, base, old, new, capsys):
    parser = build_parser()
    got_new = parser.parse_args([cmd, *base, *new])
    assert capsys.readouterr().err == ""
    got_old = parser.parse_args([cmd, *base, *old])
    err = capsys.readouterr().err
    assert vars(got_old) == vars(got_new)            # same dest, same converted type (7, 3.5)
    assert getattr(got_new, new[0][2:].replace("-", "_")) != parser.parse_args([cmd, *base]).__dict__[
        new[0][2:].replace("-", "_")]                 # the value given, not the default
    capsys.readouterr()
    assert err.count("\n") == 1
    assert err.startswith(f"raydn {cmd}: warning: {old[0]} is deprecated, use {new[0]}")


def test_every_alias_is_tested_and_no_old_spelling_is_a_live_option():
    registered = {(cmd, old, new) for cmd, p in command_parsers().items()
                  for old, new in deprecated_aliases(p).items()}
    assert registered == {(c, o[0], n[0]) for c, _, o, n in ALIASES}
    live = {s for p in command_parsers().values() for a in p._actions for s in a.option_strings
            if a.help != argparse.SUPPRESS}
    assert not {old for _, old, _ in registered} & live  # e.g. --frames means nothing anywhere now


def test_alias_reaches_the_command_end_to_end(capsys):
    """`raydn smoke --frames 0`: the warning, then the command's own check of the new option."""
    assert main(["smoke", "--frames", "0", "--no-train"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("raydn smoke: warning: --frames is deprecated, use --num-frames")
    assert err[1].startswith("raydn smoke: error: --num-frames and --batch-size must be >= 1")


def test_readme_reference_equals_the_parsers():
    import difflib
    have, want = readme_block(README.read_text(encoding="utf-8")), flag_tables()
    diff = "\n".join(difflib.unified_diff(have.splitlines(), want.splitlines(), "README.md", "parsers",
                                           lineterm="", n=0))
    assert have == want, f"README.md's command-line reference is out of date: run " \
                         f"`python tools/flag_table.py`\n{diff}"


def test_every_option_is_explained_and_spelled_alike_across_commands():
    seen: dict[str, tuple] = {}
    for cmd, p in command_parsers().items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            assert a.help, f"raydn {cmd} {a.option_strings or a.dest}: no help text"
            for s in a.option_strings:
                kind = (a.type, a.nargs, a.const)
                assert seen.setdefault(s, kind) == kind, f"{s} parses differently in raydn {cmd}"
    shared = {"--device": "auto", "--trust-checkpoint": False, "--no-progress": False}
    for cmd, p in command_parsers().items():
        for a in p._actions:
            for s in set(a.option_strings) & set(shared):
                assert a.default == shared[s], f"raydn {cmd} {s}: default {a.default!r}"
                assert a.help == next(b.help for b in command_parsers()["train"]._actions
                                      if s in b.option_strings), f"raydn {cmd} {s}: other help"


# ------------------------------------------------------------------------------------- --device

def test_device_default_rule():
    devices = {cmd: p.get_default("device") for cmd, p in command_parsers().items()
               if any("--device" in a.option_strings for a in p._actions)}
    assert set(devices) >= {"train", "eval", "infer", "smoke"} and set(devices.values()) == {"auto"}
    assert resolve_device("auto") == resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(RaydnError, match="'gpu': not a torch device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RaydnError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_bad_device_is_a_one_line_error(capsys):
    assert main(["smoke", "--device", "gpu", "--no-train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raydn smoke: error: --device 'gpu'")


# ------------------------------------------------------------------------------ raydn train

def _name(preset) -> str:
    """A preset name, or the name of a resolved :class:`raydn.presets.Preset`."""
    return getattr(preset, "name", preset)


def _capture_train(monkeypatch):
    """Replace the trainer: returns the list that receives the TrainOptions `raydn train` built."""
    import raydn.engine.train as engine_train
    got = []
    monkeypatch.setattr(engine_train, "train",
                        lambda opts: got.append(opts) or {"iteration": 0, "checkpoint": "-"})
    return got


def test_train_without_preset_or_config_is_an_error(tmp_path, capsys, monkeypatch):
    got = _capture_train(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "x.pkl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raydn train: error: give --preset NAME or --config FILE")
    assert "tiny_raydn" in err and "r50_raydn" in err       # the presets are listed
    assert not got and not out.exists()
    # --resume auto of a folder that records no run: the same error, saying why
    assert main(["train", "--data", "x.pkl", "--out", str(out), "--resume", "auto"]) == 2
    assert "--resume auto: no run folder with a config.yaml or config.json" in capsys.readouterr().err and not got


def test_train_takes_the_preset_of_the_run_it_resumes_and_threads_device_and_trust(tmp_path, monkeypatch):
    got = _capture_train(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"preset": {"name": "demo_raydn"}}))
    assert main(["train", "--data", "x.pkl", "--out", str(out), "--resume", "auto", "--device", "cpu",
                 "--trust-checkpoint", "--no-progress"]) == 0
    assert _name(got[-1].preset) == "demo_raydn" and got[-1].device == "cpu" and got[-1].trust_checkpoint
    # --resume PATH: the checkpoint's folder; an explicit --preset is passed through as given
    assert main(["train", "--data", "x.pkl", "--out", str(tmp_path / "b"), "--resume",
                 str(out / "latest.pt"), "--no-progress"]) == 0
    assert _name(got[-1].preset) == "demo_raydn" and not got[-1].trust_checkpoint
    assert got[-1].device == resolve_device("auto")
    assert main(["train", "--preset", "tiny_raydn", "--data", "x.pkl", "--out", str(out),
                 "--resume", "auto", "--no-progress"]) == 0
    assert _name(got[-1].preset) == "tiny_raydn"


def test_train_accepts_a_config_file_instead_of_a_preset(tmp_path):
    from raydn.commands.train import require_preset
    args = argparse.Namespace(preset=None, config=str(tmp_path / "run.yaml"), resume=None, out=str(tmp_path))
    require_preset(args)                              # no error: the config file names the preset
    assert args.preset is None


# ---------------------------------------------------------------------------- --trust-checkpoint

@pytest.fixture(scope="module")
def model_needing_trust(tmp_path_factory):
    """A tiny raydn model file whose extra entry is a Python object (like the mmcv 'meta' of an
    official .pth): safe loading refuses it, full unpickling reads it."""
    from raydn.interop.convert import MODEL_FORMAT
    from raydn.presets import build_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trust") / "tiny_meta.pt"
    torch.save({"format": MODEL_FORMAT, "preset": "tiny_raydn", "model": build_model("tiny_raydn").state_dict(),
                "meta": {"ratio": fractions.Fraction(1, 3)}}, path)
    return path


@pytest.mark.parametrize("cmd,argv", [
    ("train", ["--preset", "tiny_raydn", "--data", "x.pkl"]),
    ("eval", ["--checkpoint", "c.pt", "--data", "x.pkl", "--dataroot", "d"]),
    ("infer", ["--checkpoint", "c.pt", "--out", "d.jsonl"]),
    ("export", ["--checkpoint", "c.pt", "--out", "o"]),
    ("convert", ["a.pth", "b.pt"]),
])
def test_every_command_that_loads_a_checkpoint_accepts_trust_checkpoint(cmd, argv):
    parser = build_parser()
    assert parser.parse_args([cmd, *argv]).trust_checkpoint is False
    assert parser.parse_args([cmd, *argv, "--trust-checkpoint"]).trust_checkpoint is True


@pytest.mark.parametrize("cmd", ["eval", "infer"])
def test_trust_checkpoint_reaches_the_loader(cmd, model_needing_trust, tmp_path, capsys):
    """Without the flag the file is refused (with the advice); with it the model loads and the run
    goes on to the next input, which is missing here (a clean error naming it, not the checkpoint)."""
    missing = tmp_path / "missing"
    argv = {"eval": ["eval", "--checkpoint", str(model_needing_trust), "--data", str(missing / "v.pkl"),
                     "--dataroot", str(missing), "--out", str(tmp_path / "e"), "--device", "cpu"],
            "infer": ["infer", "--checkpoint", str(model_needing_trust), "--dataroot", str(missing),
                      "--out", str(tmp_path / "d.jsonl"), "--device", "cpu", "--no-progress"]}[cmd]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--trust-checkpoint" in err and "fractions.Fraction" in err
    assert main([*argv, "--trust-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "Fraction" not in err and "Traceback" not in err
