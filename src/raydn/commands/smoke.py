"""``raydn smoke``: build a preset and run it on synthetic frames (no dataset needed).

Streaming inference over a few frames (memory carried), then one training step (forward_train +
backward) on a frame with random boxes; prints shapes, losses and timings. Exit code 0 when every
output, loss and gradient is finite, 1 otherwise.
"""
from __future__ import annotations

import argparse
import time

from raydn.commands._args import (
    add_deprecated_alias,
    add_device_argument,
    resolve_device,
)
from raydn.errors import RaydnError

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "run a preset on synthetic frames: streaming predict + one training step (shapes, losses, timings)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny_raydn", metavar="NAME", help="model preset (see `raydn presets`)")
    frames = parser.add_argument("--num-frames", type=int, default=3, metavar="N",
                                 help="streaming frames to predict")
    add_deprecated_alias(parser, "--frames", frames)
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="samples per frame")
    parser.add_argument("--boxes", type=int, default=5, metavar="N", help="random GT boxes per sample (training)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="network input size (default: the preset's)")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the weights and frames")
    add_device_argument(parser)


def _fmt_shape(t) -> str:
    return "x".join(str(d) for d in t.shape)


def run(args: argparse.Namespace) -> int:
    import torch

    from raydn.data.synthetic_batch import synthetic_frame_batch
    from raydn.presets import build_model, get_preset

    if args.num_frames < 1 or args.batch_size < 1 or args.boxes < 0:
        raise RaydnError("--num-frames and --batch-size must be >= 1, --boxes >= 0")
    try:
        preset = get_preset(args.preset)
    except KeyError as e:
        raise RaydnError(e.args[0]) from None
    device = torch.device(resolve_device(args.device))
    hw = tuple(args.image_size) if args.image_size else tuple(preset.model.image_size)
    B = args.batch_size
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model = build_model(preset).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"preset {preset.name}: {n_params / 1e6:.2f} M parameters, built in "
          f"{time.perf_counter() - t0:.2f} s; input {B} x 6 x 3 x {hw[0]} x {hw[1]} on {device}")
    ok = True

    model.eval()
    state = model.init_state(B, device)
    for f in range(args.num_frames):
        batch = synthetic_frame_batch(B, hw, frame_index=f, with_targets=False,
                                      seed=args.seed).to(device)
        t = time.perf_counter()
        dets, state = model.predict(batch, state)
        dt = time.perf_counter() - t
        d = dets[0]
        finite = all(bool(torch.isfinite(x).all()) for x in (d["boxes"], d["scores"]))
        ok &= finite
        top = f"{float(d['scores'][0]):.3f}" if d["scores"].numel() else "-"
        print(f"predict frame {f} (prev_exists={int(batch.prev_exists[0])}): {dt * 1e3:8.1f} ms, "
              f"boxes {_fmt_shape(d['boxes'])}, top score {top}"
              f"{'' if finite else '  NON-FINITE'}")
    print(f"memory: embedding {_fmt_shape(state.embedding)}, reference_point "
          f"{_fmt_shape(state.reference_point)}, timestamp {state.timestamp.dtype}")

    if not args.no_train:
        model.train()
        batch = synthetic_frame_batch(B, hw, frame_index=0, num_boxes=args.boxes,
                                      seed=args.seed).to(device)
        t = time.perf_counter()
        losses, _ = model.forward_train(batch, model.init_state(B, device))
        t_fwd = time.perf_counter() - t
        total = sum(losses.values())
        t = time.perf_counter()
        total.backward()
        t_bwd = time.perf_counter() - t
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite_grads = all(bool(torch.isfinite(g).all()) for g in grads)
        finite_losses = all(bool(torch.isfinite(v)) for v in losses.values())
        ok &= finite_grads and finite_losses
        print(f"train step: forward {t_fwd * 1e3:.1f} ms, backward {t_bwd * 1e3:.1f} ms, "
              f"{len(losses)} loss terms, total {float(total.detach()):.4f}, "
              f"{len(grads)} parameter tensors with gradients"
              f"{'' if finite_grads else ' (NON-FINITE gradients)'}")
        for k, v in losses.items():
            print(f"  {k:<22s} {float(v.detach()):10.4f}")
    print("smoke run OK" if ok else "smoke run FAILED: non-finite values")
    return 0 if ok else 1
