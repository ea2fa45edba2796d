"""Resident memory of a long `raydn infer` stream (tiny preset): flat, not growing with frames.

Builds a synthetic world, saves a tiny model file, writes an own-camera calibration file that
cycles one scene's six cameras to ``--frames`` frames (timestamps keep increasing), then runs the
`raydn infer` engine on it exactly as the command does (model file -> ``load_model``, calibration
file -> ``CameraRigFrames``, DataLoader with ``--workers`` image workers, JSON lines + optionally
the MP4 video) and records every ``--every`` frames:

* the RSS of the main process and of main + its data-loader workers (``/proc``, MiB),
* the number of live ``torch.Tensor`` objects (exact: a frame kept alive shows up here first).

Prints a table and the growth between the first probe after the warm-up and the last, and writes
``--out`` (JSON, atomic) when given. Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_infer_rss.py --frames 1000 [--video] [--workers 2]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def _rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--video", action="store_true", help="also render and encode the MP4")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    from dataclasses import replace

    from raydn.data.infos import load_info_file
    from raydn.data.own_cameras import CameraRigFrames, load_camera_rig, rig_dict_from_infos, write_rig_file
    from raydn.data.prepare import prepare_infos
    from raydn.data.synth import generate_world
    from raydn.engine.stream import TorchBackend, run_stream
    from raydn.interop.convert import load_model, save_model_file
    from raydn.io import atomic_write_json
    from raydn.presets import build_model, get_preset

    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name)
    root = work / "nuscenes"
    if not (root / "v1.0-mini").is_dir():
        generate_world(root, scenes=3, seed=3, samples_per_scene=6, workers=1, progress=False)
    paths = prepare_infos(root, "v1.0-mini", work / "infos", progress=False)
    recs = load_info_file(paths["val"])["infos"]
    calib = write_rig_file(rig_dict_from_infos(recs, num_frames=args.frames), work / "calib.json")
    torch.manual_seed(0)
    save_model_file(build_model("tiny_raydn").state_dict(), work / "tiny.pt", "tiny_raydn")

    model = load_model(work / "tiny.pt")
    aug = replace(get_preset(model.preset).train.aug, training=False)
    frames = CameraRigFrames(load_camera_rig(calib), aug)
    frames.check_images()
    probes = []
    t0 = time.time()

    def probe(n, rec):
        if (n + 1) % args.every == 0:
            main_rss = _rss_mib()
            kids = sum(_rss_mib(p) for p in _children(os.getpid()) if os.path.exists(f"/proc/{p}"))
            probes.append({"frame": n + 1, "rss_main_mib": round(main_rss, 1),
                           "rss_with_workers_mib": round(main_rss + kids, 1),
                           "live_tensors": _live_tensors(), "seconds": round(time.time() - t0, 1)})
            p = probes[-1]
            print(f"frame {p['frame']:5d}  RSS main {p['rss_main_mib']:7.1f} MiB  with workers "
                  f"{p['rss_with_workers_mib']:7.1f} MiB  live tensors {p['live_tensors']:5d}  "
                  f"{p['seconds']:6.1f} s", flush=True)

    rep = run_stream(TorchBackend(model), frames, out=work / "dets.jsonl",
                     video=work / "stream.mp4" if args.video else None, score_thr=0.3,
                     num_workers=args.workers, progress=False, on_frame=probe)
    first, last = probes[min(1, len(probes) - 1)], probes[-1]  # first probe after one probe of warm-up
    growth = {k: round(last[k] - first[k], 1) for k in ("rss_main_mib", "rss_with_workers_mib", "live_tensors")}
    summary = {"frames": rep.frames, "frames_per_second": round(rep.frames_per_second, 2),
               "workers": args.workers, "video": bool(args.video), "threads": torch.get_num_threads(),
               "probes": probes, "growth_after_warmup": growth,
               "growth_from": first["frame"], "growth_to": last["frame"]}
    print(f"growth from frame {first['frame']} to {last['frame']}: {growth}")
    print(f"{rep.frames} frames at {rep.frames_per_second:.2f} frames/s")
    if args.out:
        atomic_write_json(args.out, summary, indent=1)
        print(f"written {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
