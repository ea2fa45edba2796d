"""``raydn presets``: list the model presets with their provenance and size."""
from __future__ import annotations

import json

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "list the model presets (official R50 / EVA02-L, baselines, tiny CPU presets)"


def add_arguments(p):
    p.add_argument("name", nargs="?", help="show one preset in full (JSON)")
    p.add_argument("--params", action="store_true", help="also count parameters (builds each model)")


def run(args) -> int:
    from raydn.engine.train import _jsonable
    from raydn.presets import build_model, get_preset, list_presets
    if args.name:
        print(json.dumps(_jsonable(get_preset(args.name)), indent=2))
        return 0
    for name in list_presets():
        p = get_preset(name)
        rep = p.provenance.get("reported")
        line = f"{name:18s} {p.description}"
        if rep:
            line += f"  [reported NDS {rep['NDS']}, mAP {rep['mAP']}]"
        if args.params:
            import torch
            with torch.device("meta"):
                m = build_model(name)
            line += f"  {sum(x.numel() for x in m.parameters()) / 1e6:.1f}M params"
        print(line)
    from raydn.weights import get_reference_model, list_reference_models
    names = list_reference_models()
    if names:
        print("\nreference models shipped in the package (--checkpoint NAME in infer / eval / export):")
    for n in names:
        meta = get_reference_model(n).meta
        mv = meta.get("mini_val", {}).get("fp16", {})
        print(f"{n:26s} preset {meta.get('preset')}, {meta.get('iterations')} iterations, synthetic "
              f"mini_val mAP {mv.get('mAP', float('nan')):.3f} NDS {mv.get('NDS', float('nan')):.3f}, "
              f"{meta.get('size_bytes', 0) / 1e6:.1f} MB")
    return 0
