"""``raydn infer``: a trained model over a nuScenes scene/split or your own cameras -> detections as
JSON lines, optional pictures and MP4 video (see :mod:`raydn.engine.stream`)."""
from __future__ import annotations

from raydn.commands._args import (
    add_deprecated_alias,
    add_device_argument,
    add_progress_argument,
    add_tracker_arguments,
    add_trust_argument,
    resolve_device,
)
from raydn.errors import RaydnError

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "streaming inference on a nuScenes scene/split or your own cameras: JSON lines, pictures, MP4"


def add_arguments(p):
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="raydn checkpoint, `raydn convert` output, official .pth, or a shipped reference model's "
                        "name (e.g. demo_raydn-reference; `raydn presets` lists them) (--backend torch)")
    m.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="run the PyTorch model (--checkpoint) or exported ONNX graphs (--onnx)")
    m.add_argument("--onnx", default=None, metavar="DIR", help="`raydn export` output folder (--backend onnxruntime)")
    m.add_argument("--preset", default=None, metavar="NAME",
                   help="preset of a model file that names none (an official .pth); the preset a "
                        "checkpoint or export records always wins, and a different --preset is an error")
    add_device_argument(m)
    add_trust_argument(m)
    d = p.add_argument_group("input: a nuScenes dataroot (real or synthetic)")
    d.add_argument("--dataroot", default=None, metavar="DIR", help="nuScenes dataroot")
    d.add_argument("--version", default=None, help="v1.0-mini / v1.0-trainval / v1.0-test (default: the one present)")
    data = d.add_argument("--data", default=None, metavar="INFOS",
                          help="info pickle from `raydn prepare` (default: read the tables)")
    add_deprecated_alias(d, "--infos", data)
    d.add_argument("--scene", action="append", default=None, metavar="NAME",
                   help="scene name, e.g. scene-0103 (repeatable); default: every scene of --split")
    d.add_argument("--split", default=None, metavar="SPLIT", help="official split (default: mini_val / val / test)")
    c = p.add_argument_group("input: your own cameras")
    c.add_argument("--cameras", default=None, metavar="CALIB",
                   help="calibration/odometry file (.json or .yaml; format in the README)")
    images = c.add_argument("--images", default=None, metavar="DIR",
                            help="folder the image paths are relative to (default: the calibration file's)")
    add_deprecated_alias(c, "--frames", images)
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="FILE.jsonl", help="detections, one JSON object per frame (.jsonl)")
    o.add_argument("--render", default=None, metavar="DIR", help="write one PNG per frame here")
    o.add_argument("--video", default=None, metavar="FILE.mp4", help="write an MP4 of the rendered frames")
    o.add_argument("--fps", type=float, default=None,
                   help="video frame rate (default: the cameras' rate; nuScenes keyframes: 2)")
    o.add_argument("--score-thr", type=float, default=0.3,
                   help="keep (and draw) detections with score >= this (default 0.3; 0 keeps all)")
    o.add_argument("--limit", type=int, default=None, metavar="N", help="stop after this many frames")
    o.add_argument("--workers", type=int, default=2, metavar="N", help="image-loading worker processes")
    add_tracker_arguments(p.add_argument_group("tracks (the 'id' of every detection)"))
    add_progress_argument(o)


def run(args) -> int:
    from raydn.engine.stream import (
        StreamOptions,
        check_camera_count,
        nuscenes_stream,
        open_backend,
        run_stream,
        select_nuscenes_records,
    )
    from raydn.presets import get_preset

    if (args.dataroot is None) == (args.cameras is None):
        raise RaydnError("give exactly one input: --dataroot DIR (nuScenes) or --cameras CALIB (own cameras)")
    if args.cameras is None and args.images is not None:
        raise RaydnError("--images goes with --cameras")
    if args.score_thr < 0 or args.score_thr > 1:
        raise RaydnError(f"--score-thr must be in [0, 1], got {args.score_thr}")
    if args.limit is not None and args.limit < 1:
        raise RaydnError(f"--limit must be >= 1, got {args.limit}")
    if args.video is not None:
        from raydn.viz.video import require_video_support
        require_video_support()  # fail before any work
    if args.backend == "onnxruntime" and args.checkpoint is not None:
        raise RaydnError("--checkpoint goes with --backend torch: --backend onnxruntime runs the graphs "
                         "of --onnx DIR, whose weights were fixed by `raydn export`")
    if args.backend == "torch" and args.onnx is not None:
        raise RaydnError("--onnx DIR goes with --backend onnxruntime (--backend torch runs --checkpoint)")
    from raydn.interop.convert import resolve_preset
    model = None
    if args.backend == "torch" and args.checkpoint is not None:
        from raydn.interop.convert import load_model
        model = load_model(args.checkpoint, args.preset,   # the checkpoint's own preset wins
                           trust=args.trust_checkpoint)
    backend = open_backend(args.backend, checkpoint=args.checkpoint, onnx_dir=args.onnx,
                           device=resolve_device(args.device), model=model)
    preset = resolve_preset(backend.preset, args.preset,
                            args.checkpoint if model is not None else str(args.onnx))
    if preset is None:
        raise RaydnError("the model files name no preset: pass --preset (the input transform)")
    try:
        aug = get_preset(preset).test_transform()
    except KeyError as e:
        raise RaydnError(str(e.args[0])) from None

    scene_names = None
    if args.cameras is not None:
        from raydn.data.own_cameras import CameraRigFrames, load_camera_rig
        rig = load_camera_rig(args.cameras, args.images)
        check_camera_count(backend.num_cams, rig.num_cams, f"{args.cameras}")
        frames = CameraRigFrames(rig, aug)
        frames.check_images()
        what = f"{len(frames)} frames of {rig.num_cams} cameras ({', '.join(rig.camera_names)})"
    else:
        records, scene_names, version = select_nuscenes_records(
            args.dataroot, version=args.version, infos=args.data, scenes=args.scene, split=args.split)
        check_camera_count(backend.num_cams, 6, f"nuScenes ({args.dataroot})")
        frames = nuscenes_stream(records, aug, data_root=args.dataroot)
        what = f"{len(frames)} frames of {len(scene_names)} scene(s) of {version}"
    print(f"raydn infer: {what}, backend {backend.name}, preset {preset}")
    rep = run_stream(backend, frames, StreamOptions(
        out=args.out, render_dir=args.render, video=args.video, fps=args.fps, score_thr=args.score_thr,
        aug=aug, scene_names=scene_names, num_workers=args.workers, limit=args.limit,
        progress=not args.no_progress, tracker=args.tracker, birth_score=args.birth_score,
        keep_score=args.keep_score))
    print(f"{rep.frames} frames, {rep.detections} detections (score >= {args.score_thr:g}), "
          f"{rep.frames_per_second:.2f} frames/s")
    print(f"detections: {rep.out}")
    if not rep.ids:
        print("note: this backend does not report the model's selection: no memory tracks ('id' is null; "
              "re-export the model, or use --tracker velocity)")
    if rep.render_dir:
        print(f"pictures:   {rep.render_dir}")
    if rep.video:
        print(f"video:      {rep.video} ({rep.video_frames} frames)")
    return 0
