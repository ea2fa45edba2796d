"""``raydn synth``: write a synthetic world as a genuine nuScenes dataroot."""
from __future__ import annotations

import time

from raydn.commands._args import add_progress_argument

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "generate a synthetic world in the nuScenes format (images, lidar, 13 tables)"


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataroot folder (must be empty or absent)")
    parser.add_argument("--scenes", type=int, default=10, metavar="N", help="number of scenes (default 10: 8 mini_train + 2 mini_val)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="world seed (same seed -> identical files)")
    parser.add_argument("--split", choices=("mini", "trainval"), default="mini",
                        help="scene names / version folder: mini -> v1.0-mini, trainval -> v1.0-trainval")
    parser.add_argument("--samples-per-scene", type=int, default=40, metavar="N", help="keyframes per scene at 2 Hz (default 40 = 20 s)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="render processes (output does not depend on it)")
    parser.add_argument("--render-scale", type=float, default=0.4, metavar="S",
                        help="internal render resolution relative to 1600x900 (images are upscaled)")
    parser.add_argument("--profile", choices=("realistic", "demo", "rays"), default="realistic",
                        help="world layout: realistic (nuScenes-like, objects up to ~60 m), demo "
                             "(slow ego, objects within ~35 m; what `raydn demo` trains on) or rays "
                             "(demo + columns of cars / pedestrians one behind another along camera rays)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_progress_argument(parser)


def run(args) -> int:

    from raydn.data.synth import generate_world
    t0 = time.time()
    out = generate_world(args.out, scenes=args.scenes, seed=args.seed, split=args.split,
                         samples_per_scene=args.samples_per_scene, workers=args.workers,
                         scale=args.render_scale, profile=args.profile, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out} ({args.scenes} scenes x {args.samples_per_scene} samples) in {time.time() - t0:.1f} s")
    return 0
