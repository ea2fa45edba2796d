"""The ``raydn`` command's answers to asking for help, a version, an unknown command or preset: one line
(usage errors) or the help text, a non-zero exit where something was wrong, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from raydn import __version__
from raydn.cli import COMMANDS, main

NAMES = [name for name, _ in COMMANDS]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"raydn {__version__}"


@pytest.mark.parametrize("command", NAMES)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith(f"usage: raydn {command}") and "-h, --help" in out


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("raydn: error: argument COMMAND: invalid choice: 'frobnicate'")
    assert "'train'" in err and "(see 'raydn --help')" in err


def test_bad_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x.pkl", "--no-such-option"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("raydn: error: unrecognized arguments: --no-such-option")


@pytest.mark.parametrize("argv", [
    ["train", "--data", "x.pkl", "--preset", "r51_raydn"],
    ["smoke", "--preset", "r51_raydn"],
    ["presets", "r51_raydn"],
])
def test_unknown_preset_is_one_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and "Traceback" not in cap.err
    assert cap.err.startswith(f"raydn {argv[0]}: error: unknown preset 'r51_raydn'; available: r50_raydn")
    assert not list(tmp_path.iterdir())               # nothing written (no work_dirs/run)


def test_the_installed_entry_point_answers_in_one_line():
    """Through a real process (the console script's code path, exit status included)."""
    proc = subprocess.run([sys.executable, "-m", "raydn.cli", "frobnicate"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
