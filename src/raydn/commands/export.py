"""``raydn export --checkpoint CKPT --out DIR``: ONNX graphs of a trained model for deployment.

Writes ``encoder.onnx`` (images -> feature levels), ``head_step.onnx`` (one streaming frame: features
+ calibration + pose + timestamp + prev_exists + memory in -> detections + memory out) and
``raydn_onnx.json`` (preset, input size, mean/std, class names, graph I/O) into DIR, then checks
onnxruntime against PyTorch over 5 synthetic frames with a memory reset (``--no-check`` skips it).
Run the result with ``raydn.deploy.OnnxDetector`` (or ``raydn infer --backend onnxruntime``).
Exit code 0 on success, 1 when the parity check fails, 2 on bad input.
"""
from __future__ import annotations

import argparse
import time

from raydn.commands._args import add_trust_argument
from raydn.io import OutputFolder

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "export a model to ONNX (image encoder + one streaming head step) and check it with onnxruntime"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="raydn model file / training checkpoint / official .pth (see `raydn convert`) or a "
                             "shipped reference model's name (e.g. demo_raydn-reference)")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="preset of a checkpoint that names none (one that records its preset uses "
                             "it: a different --preset is an error); without --checkpoint the preset is "
                             "exported with seeded random weights (for testing/timing)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (files replaced atomically)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="batch size fixed in the graphs")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    parser.add_argument("--tolerance", type=float, default=1e-4, metavar="TOL", help="parity tolerance (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random weights (no --checkpoint)")
    add_trust_argument(parser)


def run(args: argparse.Namespace) -> int:
    from raydn.interop.export import ExportError, export_model
    if args.batch_size < 1:
        raise ExportError("--batch-size must be >= 1")
    if args.checkpoint is None and args.preset is None:
        raise ExportError("give --checkpoint CKPT (a trained model) or --preset NAME (random weights)")
    if args.preset is not None:
        from raydn.presets import get_preset
        try:
            get_preset(args.preset)
        except KeyError as e:
            raise ExportError(e.args[0]) from None
    if args.checkpoint is None:
        print(f"note: no --checkpoint: exporting {args.preset} with random weights (seed {args.seed})")
    t0 = time.perf_counter()
    try:
        with OutputFolder(args.out, "export"):  # locked while writing; a failed first export leaves no folder
            report = export_model(args.out, checkpoint=args.checkpoint, preset=args.preset,
                                  batch_size=args.batch_size, check=not args.no_check, seed=args.seed,
                                  trust=args.trust_checkpoint, tolerance=args.tolerance)
    except ExportError as e:
        if "differs from PyTorch" in str(e):
            print(f"raydn export: parity check failed: {e}")
            return 1
        raise
    print(report.summary())
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0
