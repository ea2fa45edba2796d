"""``raydn convert OFFICIAL.pth OUT.pt``: official RayDN/StreamPETR checkpoint -> raydn model file.

The output is ``{"format": "raydn-model/1", "preset": NAME, "model": state_dict, "source": ...}``
(tensors and strings only, loads with ``weights_only=True``); ``raydn eval`` and
``raydn.interop.convert.load_model`` build the named preset from it. The input is read with
``weights_only=True`` unless ``--trust-checkpoint`` is given.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raydn.commands._args import add_trust_argument
from raydn.errors import CheckpointError

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "convert an official RayDN / StreamPETR (RepDETR3D) checkpoint to a raydn model file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("official", help="official checkpoint (.pth)")
    parser.add_argument("out", help="output file (.pt), written atomically")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, metavar="NAME",
                   help="check keys/shapes against the model of this preset (e.g. r50_raydn) and "
                        "record it in the output (default: detected from the keys and shapes; a raydn "
                        "model file's own preset wins, a different one is an error)")
    g.add_argument("--keys", default=None, metavar="FILE",
                   help="check against an official key listing (key<TAB>[shape]<TAB>dtype lines); "
                        "the preset is then detected if one matches")
    add_trust_argument(parser)
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="write the output even if the report shows problems (exit code stays 1)")


def _preset_model_shapes(name: str) -> dict:
    from raydn.interop.convert import preset_shapes
    from raydn.presets import get_preset
    try:
        get_preset(name)
    except KeyError as e:
        raise CheckpointError(f"--preset: {e.args[0]}") from None
    return preset_shapes(name)


def run(args: argparse.Namespace) -> int:
    from raydn.interop.convert import (
        DETECTABLE_PRESETS,
        MODEL_FORMAT,
        TRAIN_FORMAT,
        convert_official_state_dict,
        detect_preset,
        load_checkpoint_file,
        preset_shapes,
        read_key_list,
        resolve_preset,
        save_model_file,
    )
    raw = load_checkpoint_file(args.official, trust=args.trust_checkpoint)
    note = ""
    # a raydn model file / training checkpoint names its preset: that one wins over --preset
    ours = isinstance(raw, dict) and raw.get("format") in (MODEL_FORMAT, TRAIN_FORMAT)
    recorded = raw.get("preset") if ours else None
    chosen = resolve_preset(recorded, args.preset, str(args.official))
    if chosen and not args.keys:
        preset, expected = chosen, _preset_model_shapes(chosen)
    else:
        unchecked, _ = convert_official_state_dict(raw)
        preset = detect_preset(unchecked)
        if preset is not None:
            base = preset.split("_")[0]
            note = (f"preset: {preset} (detected from keys and shapes; {base}_repdetr3d has the "
                    f"same weights: pass --preset to record that one instead)")
        if args.keys:
            expected = read_key_list(args.keys)
        elif preset is not None:
            expected = preset_shapes(preset)
        else:  # report against the closest preset so that the user sees what differs
            have = {(k, tuple(v.shape)) for k, v in unchecked.items()}
            closest = max(DETECTABLE_PRESETS, key=lambda p: len(have & set(preset_shapes(p).items())))
            expected = preset_shapes(closest)
            note = (f"no preset matches these keys/shapes; compared with the closest, {closest} "
                    f"(pass --preset or --keys to choose)")
    sd, report = convert_official_state_dict(raw, expected=expected)
    print(report.summary())
    if note:
        print(f"  {note}")
    if report.ok or args.allow_mismatch:
        save_model_file(sd, args.out, preset, source=Path(args.official).name)
        print(f"wrote {len(sd)} tensors (preset {preset}) to {args.out}")
    else:
        hint = ""
        if args.preset:  # e.g. an EVA02 checkpoint given with --preset r50_raydn: say which one fits
            actual = detect_preset(convert_official_state_dict(raw)[0])
            if actual is not None and actual.split("_")[0] != args.preset.split("_")[0]:
                hint = f"; its keys and shapes are those of preset {actual}: pass --preset {actual}"
        print(f"raydn convert: error: {args.official} does not match the expected model "
              f"(see the report above); {args.out} not written (--allow-mismatch writes anyway){hint}",
              file=sys.stderr)
    return 0 if report.ok else 1
