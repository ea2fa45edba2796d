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
``tracking_nips_2019``), and the CLEAR-MOT ID switches at score >= 0.3 of all ground-truth tracks and
of those whose object has a duplicate detection along its camera ray
(:func:`raydn.eval.tracking.id_switches_along_rays`). Each model's rows go to ``OUT/NAME/rows.json``;
every run (also of earlier invocations, e.g. another world) is gathered into ``tracking_table.md`` /
``.json`` (mean ± std over the seeds of a NAME without its ``_s<seed>``) and ``tracking.png``;
``--report`` only gathers.
Needs ``pip install 'raydn[nuscenes,tracking]'``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


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
    """One model: streaming inference over the split once, then each tracker on its detections,
    scored by the devkit and by :func:`raydn.eval.tracking.id_switches_along_rays`."""
    from raydn.data.dataset import NuScenesStreamingDataset
    from raydn.data.infos import load_info_file
    from raydn.engine.infer import default_eval_set, stream_inference
    from raydn.engine.tracking import save_tracking_submission, track_stream
    from raydn.eval.tracking import (
        annotation_instances,
        id_switches_along_rays,
        run_tracking_eval,
    )
    from raydn.interop.convert import load_model
    from raydn.presets import get_preset
    model = load_model(str(ckpt)).eval()
    info = load_info_file(data)
    version = info.get("metadata", {}).get("version", "v1.0-mini")
    aug = replace(get_preset(model.preset).train.aug, training=False)
    dataset = NuScenesStreamingDataset(info, aug, test_mode=True, validate=False)
    instances = annotation_instances(dataroot, version)
    t = time.time()
    dets, _ = stream_inference(model, dataset, num_workers=workers, progress=False,
                               nms=model.cfg.head.nms_radius is not None, with_selection=True)
    infer_s = time.time() - t
    rows = []
    for kind in trackers:
        d = out / name / kind
        d.mkdir(parents=True, exist_ok=True)
        g, ids = track_stream(dets, dataset.infos, tracker=kind, head=model.cfg.head)
        path = save_tracking_submission(g, ids, d / "tracking_results_nusc.json")
        s = run_tracking_eval(path, dataroot, version, default_eval_set(version), d, quiet=True)
        sw = id_switches_along_rays(dets, dataset.infos, ids, instances)
        rows.append({"model": name, "group": group_of(name), "tracker": kind, "checkpoint": str(ckpt),
                     "amota": s["amota"], "amotp": s["amotp"], "mota": s["mota"], "recall": s["recall"],
                     "ids": int(s["ids"]), "frag": int(s["frag"]),
                     "id_switches": sw["id_switches"], "gt_tracks": sw["tracks"],
                     "ray_dup_ids": sw["ray_duplicate_id_switches"], "ray_dup_tracks": sw["ray_duplicate_tracks"],
                     "inference_s": round(infer_s, 1)})
        print(f"{name} {kind}: AMOTA {s['amota']:.3f} IDS {int(s['ids'])} | ID switches {sw['id_switches']} "
              f"of {sw['tracks']} tracks, {sw['ray_duplicate_id_switches']} of the "
              f"{sw['ray_duplicate_tracks']} with a ray duplicate", flush=True)
    return rows


def group_of(name: str) -> str:
    """``rays/raydn_s1`` -> ``rays/raydn``: the runs that differ only by seed."""
    return re.sub(r"_s\d+$", "", name)


def _ms(values) -> str:
    v = np.asarray(values, np.float64)
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def _mi(values) -> str:
    v = np.asarray(values, np.float64)
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.0f}"


def table(rows: list[dict]) -> str:
    """Mean ± std over the seeds of each group and tracker (population std), then the runs."""
    head = ("| model | tracker | seeds | AMOTA | AMOTP | MOTA | recall | IDS (devkit) | ID switches (score ≥ 0.3) | "
            "GT tracks with a ray duplicate | their ID switches |")
    lines = [head, "|" + "---|" * 11]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("group", group_of(r["model"])), r["tracker"]), []).append(r)
    for (grp, kind), rs in groups.items():
        lines.append(f"| {grp} | {kind} | {len(rs)} | {_ms([r['amota'] for r in rs])} | "
                     f"{_ms([r['amotp'] for r in rs])} | {_ms([r['mota'] for r in rs])} | "
                     f"{_ms([r['recall'] for r in rs])} | {_mi([r['ids'] for r in rs])} | "
                     f"{_mi([r['id_switches'] for r in rs])} | {_mi([r['ray_dup_tracks'] for r in rs])} | "
                     f"{_mi([r['ray_dup_ids'] for r in rs])} |")
    lines += ["", "Per run:", "", "| run | tracker | AMOTA | MOTA | IDS | ID switches | GT tracks | "
              "with a ray duplicate | their ID switches |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tracker']} | {r['amota']:.3f} | {r['mota']:.3f} | {r['ids']} | "
                     f"{r['id_switches']} | {r['gt_tracks']} | {r['ray_dup_tracks']} | {r['ray_dup_ids']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """AMOTA and the ID switches of tracks with a ray duplicate, per model group and tracker
    (bars: mean over seeds; dots: the seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raydn.io import atomic_path
    groups = list(dict.fromkeys(r.get("group", group_of(r["model"])) for r in rows))
    trackers = list(dict.fromkeys(r["tracker"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / max(1, len(trackers))
    for ax, key, title in zip(axes, ("amota", "id_switches", "ray_dup_ids"),
                              ("AMOTA (devkit)", "ID switches, all GT tracks (score ≥ 0.3)",
                               "ID switches of GT tracks with a duplicate along their ray")):
        for ti, kind in enumerate(trackers):
            x = np.arange(len(groups)) + (ti - (len(trackers) - 1) / 2) * width
            vals = [[r[key] for r in rows if r.get("group", group_of(r["model"])) == g and r["tracker"] == kind]
                    for g in groups]
            ax.bar(x, [np.mean(v) if v else 0.0 for v in vals], width, label=f"{kind} tracker", alpha=0.8)
            for xi, v in zip(x, vals):
                ax.plot([xi] * len(v), v, "k.", ms=5)
        ax.set_xticks(np.arange(len(groups)), groups, rotation=15, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=CKPT")
    p.add_argument("--data", default=None, metavar="INFOS")
    p.add_argument("--dataroot", default=None, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--quick", action="store_true", help="untrained tiny model, tiny world: the pipeline only")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--report", action="store_true",
                   help="only gather the runs already under --out (table + tracking.png)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.report:
        ckpts = {}
    elif a.quick:
        data, root, ckpts = quick_setup(out)
    else:
        if not (a.checkpoint and a.data and a.dataroot):
            p.error("give --checkpoint NAME=CKPT (one or more), --data and --dataroot, or --quick")
        data, root = Path(a.data), Path(a.dataroot)
        ckpts = dict(c.split("=", 1) for c in a.checkpoint)
    from raydn.io import atomic_write_json
    for name, ckpt in ckpts.items():  # per model: one inference, both trackers
        rows = evaluate_checkpoint(name, Path(ckpt), data, root, out, workers=a.workers)
        atomic_write_json(out / name / "rows.json", rows, indent=2)
    rows = [r for f in sorted(out.glob("**/rows.json")) for r in json.loads(f.read_text())]
    if not rows:
        p.error(f"no runs under {out}")
    atomic_write_json(out / "tracking_table.json", rows, indent=2)
    text = table(rows)
    (out / "tracking_table.md").write_text(text + "\n")
    print(text)
    print(f"plot: {plot(rows, out / 'tracking.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
