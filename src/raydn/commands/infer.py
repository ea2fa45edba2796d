"""``raydn infer``: a trained model over a nuScenes scene/split or your own cameras -> detections as
JSON lines, optional pictures and MP4 video (see :mod:`raydn.engine.stream`)."""
from __future__ import annotations

HELP = "streaming inference on a nuScenes scene/split or your own cameras: JSON lines, pictures, MP4"


def add_arguments(p):
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", default=None,
                   help="raydn checkpoint, `raydn convert` output or official .pth (--backend torch)")
    m.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    m.add_argument("--onnx", default=None, help="`raydn export` output folder (--backend onnxruntime)")
    m.add_argument("--preset", default=None,
                   help="preset whose input transform to use when the model files do not name one")
    m.add_argument("--device", default=None, help="torch device (default: cpu)")
    d = p.add_argument_group("input: a nuScenes dataroot (real or synthetic)")
    d.add_argument("--dataroot", default=None, help="nuScenes dataroot")
    d.add_argument("--version", default=None, help="v1.0-mini / v1.0-trainval / v1.0-test (default: the one present)")
    d.add_argument("--infos", default=None, help="info pickle from `raydn prepare` (default: read the tables)")
    d.add_argument("--scene", action="append", default=None, metavar="NAME",
                   help="scene name, e.g. scene-0103 (repeatable); default: every scene of --split")
    d.add_argument("--split", default=None, help="official split (default: mini_val / val / test)")
    c = p.add_argument_group("input: your own cameras")
    c.add_argument("--cameras", default=None, metavar="CALIB",
                   help="calibration/odometry file (.json or .yaml; format in the README)")
    c.add_argument("--frames", default=None, metavar="DIR",
                   help="folder the image paths are relative to (default: the calibration file's)")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="detections, one JSON object per frame (.jsonl)")
    o.add_argument("--render", default=None, metavar="DIR", help="write one PNG per frame here")
    o.add_argument("--video", default=None, metavar="FILE.mp4", help="write an MP4 of the rendered frames")
    o.add_argument("--fps", type=float, default=None,
                   help="video frame rate (default: the cameras' rate; nuScenes keyframes: 2)")
    o.add_argument("--score-thr", type=float, default=0.3,
                   help="keep (and draw) detections with score >= this (default 0.3; 0 keeps all)")
    o.add_argument("--limit", type=int, default=None, help="stop after this many frames")
    o.add_argument("--workers", type=int, default=2, help="image-loading worker processes")
    o.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from dataclasses import replace

    from raydn.engine.stream import (check_camera_count, nuscenes_stream, open_backend, run_stream,
                                     select_nuscenes_records)
    from raydn.errors import RaydnError
    from raydn.presets import get_preset

    if (args.dataroot is None) == (args.cameras is None):
        raise RaydnError("give exactly one input: --dataroot DIR (nuScenes) or --cameras CALIB (own cameras)")
    if args.cameras is None and args.frames is not None:
        raise RaydnError("--frames goes with --cameras")
    if args.score_thr < 0 or args.score_thr > 1:
        raise RaydnError(f"--score-thr must be in [0, 1], got {args.score_thr}")
    if args.limit is not None and args.limit < 1:
        raise RaydnError(f"--limit must be >= 1, got {args.limit}")
    if args.video is not None:
        from raydn.viz.video import require_video_support
        require_video_support()  # fail before any work
    backend = open_backend(args.backend, checkpoint=args.checkpoint, onnx_dir=args.onnx,
                           device=args.device or "cpu")
    preset = args.preset or backend.preset
    if preset is None:
        raise RaydnError("the model files name no preset: pass --preset (the input transform)")
    try:
        aug = replace(get_preset(preset).train.aug, training=False)
    except KeyError as e:
        raise RaydnError(str(e.args[0])) from None

    scene_names = None
    if args.cameras is not None:
        from raydn.data.own_cameras import CameraRigFrames, load_camera_rig
        rig = load_camera_rig(args.cameras, args.frames)
        check_camera_count(backend.num_cams, rig.num_cams, f"{args.cameras}")
        frames = CameraRigFrames(rig, aug)
        frames.check_images()
        what = f"{len(frames)} frames of {rig.num_cams} cameras ({', '.join(rig.camera_names)})"
    else:
        records, scene_names, version = select_nuscenes_records(
            args.dataroot, version=args.version, infos=args.infos, scenes=args.scene, split=args.split)
        check_camera_count(backend.num_cams, 6, f"nuScenes ({args.dataroot})")
        frames = nuscenes_stream(records, aug, data_root=args.dataroot)
        what = f"{len(frames)} frames of {len(scene_names)} scene(s) of {version}"
    print(f"raydn infer: {what}, backend {backend.name}, preset {preset}")
    rep = run_stream(backend, frames, out=args.out, render_dir=args.render, video=args.video,
                     fps=args.fps, score_thr=args.score_thr, aug=aug, scene_names=scene_names,
                     num_workers=args.workers, limit=args.limit, progress=not args.no_progress)
    print(f"{rep.frames} frames, {rep.detections} detections (score >= {args.score_thr:g}), "
          f"{rep.frames_per_second:.2f} frames/s")
    print(f"detections: {rep.out}")
    if not rep.ids:
        print("note: this backend does not report query ids ('id' is null)")
    if rep.render_dir:
        print(f"pictures:   {rep.render_dir}")
    if rep.video:
        print(f"video:      {rep.video} ({rep.video_frames} frames)")
    return 0
