"""Tracking on the synthetic world (issue 19, step 5): both trackers on trained checkpoints, scored
with nuscenes-devkit's tracking metric; prints a markdown table.

    # trained models (e.g. `raydn demo` / `raydn train` runs with and without ray denoising,
    # >= 2 seeds each), on the world their val infos describe:
    python benchmarks/bench_tracking.py --data INFOS_VAL.pkl --dataroot WORLD \
        --checkpoint raydn_s0=run_a/model.pt --checkpoint raydn_s1=run_b/model.pt \
        --checkpoint nodn_s0=run_c/model.pt --checkpoint nodn_s1=run_d/model.pt --out bench_tracking
    # the pipeline only (an UNTRAINED tiny model on a tiny generated world: numbers mean nothing):
    python benchmarks/bench_tracking.py --quick --out /tmp/bench_tracking

Per checkpoint and tracker: AMOTA, AMOTP, MOTA, recall, IDS, FRAG (devkit ``TrackingEval``,
``tracking_nips_2019``), and the ID switches of tracks whose object has a duplicate detection along
its camera ray (``--ray-ids``: not implemented yet -- the column is left empty; see issue 19).
Needs ``pip install 'raydn[nuscenes,tracking]'``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def quick_setup(out: Path) -> tuple[Path, Path, dict[str, Path]]:
    """A tiny generated world (2 scenes x 4 keyframes), its infos and an untrained tiny model."""
    import torch

    from raydn.data.prepare import prepare_infos
    from raydn.data.synth import generate_world
    from raydn.interop.convert import save_model_file
    from raydn.presets import build_model
    root = out / "world" / "nuscenes"
    if not root.exists():
        generate_world(root, scenes=2, seed=0, samples_per_scene=4, workers=1, progress=False)
    infos = prepare_infos(root, "v1.0-mini", out / "infos", progress=False)
    torch.manual_seed(0)
    ckpt = out / "tiny_untrained.pt"
    save_model_file(build_model("tiny_raydn").state_dict(), ckpt, "tiny_raydn")
    return Path(infos["val"]), root, {"tiny_untrained": ckpt}


def evaluate_checkpoint(name: str, ckpt: Path, data: Path, dataroot: Path, out: Path,
                        trackers=("memory", "velocity"), workers: int = 0) -> list[dict]:
    from raydn.data.dataset import NuScenesStreamingDataset
    from raydn.data.infos import load_info_file
    from raydn.engine.infer import default_eval_set, stream_inference
    from raydn.engine.tracking import write_tracking_submission
    from raydn.eval.tracking import run_tracking_eval
    from raydn.interop.convert import load_model
    from raydn.presets import get_preset
    model = load_model(str(ckpt)).eval()
    info = load_info_file(data)
    version = info.get("metadata", {}).get("version", "v1.0-mini")
    aug = replace(get_preset(model.preset).train.aug, training=False)
    dataset = NuScenesStreamingDataset(info, aug, test_mode=True, validate=False)
    t = time.time()
    dets, _ = stream_inference(model, dataset, num_workers=workers, progress=False,
                               nms=model.cfg.head.nms_radius is not None, with_selection=True)
    infer_s = time.time() - t
    rows = []
    for kind in trackers:
        d = out / name / kind
        d.mkdir(parents=True, exist_ok=True)
        path = write_tracking_submission(dets, dataset.infos, d / "tracking_results_nusc.json",
                                         tracker=kind, head=model.cfg.head)
        s = run_tracking_eval(path, dataroot, version, default_eval_set(version), d, quiet=True)
        rows.append({"model": name, "tracker": kind, "amota": s["amota"], "amotp": s["amotp"],
                     "mota": s["mota"], "recall": s["recall"], "ids": s["ids"], "frag": s["frag"],
                     "ray_dup_ids": None, "inference_s": round(infer_s, 1)})
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | tracker | AMOTA | AMOTP | MOTA | recall | IDS | FRAG | ray-duplicate IDS |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tracker']} | {r['amota']:.3f} | {r['amotp']:.3f} | {r['mota']:.3f} | "
                     f"{r['recall']:.3f} | {r['ids']} | {r['frag']} | {r['ray_dup_ids'] or '--'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=CKPT")
    p.add_argument("--data", default=None, metavar="INFOS")
    p.add_argument("--dataroot", default=None, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--quick", action="store_true", help="untrained tiny model, tiny world: the pipeline only")
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        data, root, ckpts = quick_setup(out)
    else:
        if not (a.checkpoint and a.data and a.dataroot):
            p.error("give --checkpoint NAME=CKPT (one or more), --data and --dataroot, or --quick")
        data, root = Path(a.data), Path(a.dataroot)
        ckpts = dict(c.split("=", 1) for c in a.checkpoint)
    rows = []
    for name, ckpt in ckpts.items():  # per model: one inference, both trackers
        rows += evaluate_checkpoint(name, Path(ckpt), data, root, out, workers=a.workers)
    (out / "tracking_table.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
