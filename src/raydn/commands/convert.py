"""``raydn convert OFFICIAL.pth OUT.pt``: official RayDN/StreamPETR checkpoint -> raydn state dict."""
from __future__ import annotations

import argparse

from raydn.errors import CheckpointError

HELP = "convert an official RayDN / StreamPETR (RepDETR3D) checkpoint to a raydn state dict"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("official", help="official checkpoint (.pth)")
    parser.add_argument("out", help="output file (.pt), written atomically")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None,
                   help="check keys/shapes against the model of this preset (e.g. r50_raydn)")
    g.add_argument("--keys", default=None,
                   help="check against an official key listing (key<TAB>[shape]<TAB>dtype lines)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow full unpickling of the input (only for files you trust)")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="write the output even if the report shows problems (exit code stays 1)")


def _expected_from_preset(name: str):
    try:
        from raydn.presets import get_preset  # the lead's preset table
        from raydn.models.detector import build_detector
    except ImportError as e:
        raise CheckpointError(f"--preset {name}: presets/detector are not available in this "
                              f"build ({e}); use --keys FILE instead") from None
    try:
        cfg = get_preset(name)
    except KeyError:
        raise CheckpointError(f"--preset {name}: unknown preset") from None
    model = build_detector(getattr(cfg, "model", cfg))
    return model


def run(args: argparse.Namespace) -> int:
    from raydn.interop.convert import (
        convert_official_state_dict, load_checkpoint_file, read_key_list, save_state_dict_atomic,
    )
    expected = None
    if args.preset:
        expected = _expected_from_preset(args.preset)
    elif args.keys:
        expected = read_key_list(args.keys)
    sd, report = convert_official_state_dict(
        load_checkpoint_file(args.official, trust=args.trust_checkpoint), expected=expected)
    print(report.summary())
    if expected is None:
        print("  (no --preset/--keys given: key names and shapes were not checked)")
    if report.ok or args.allow_mismatch:
        save_state_dict_atomic(sd, args.out)
        print(f"wrote {len(sd)} tensors to {args.out}")
    else:
        print(f"not written: {args.out} (use --allow-mismatch to write anyway)")
    return 0 if report.ok else 1
