"""Run by torchrun as one of two "nodes" in tests/engine/test_multinode.py (gloo, 1 process each).

Trains tiny_raydn for ``iters`` iterations into ``OUT/run`` with the trainer's own DDP settings,
recording the sample tokens each rank trains on, then again into ``OUT/ref`` with DDP's
``find_unused_parameters=True`` forced (the setting used before), printing a marker line to stderr
in between. Rank 0 writes ``RESULT`` (a JSON file outside the run folders)."""
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import raydn.engine.train as T
from raydn.engine.distributed import cleanup_distributed, setup_distributed

REFERENCE_MARKER = "=== reference run: find_unused_parameters=True ==="


def train(info, infos: str, out: Path, iters: int):
    opts = T.TrainOptions(preset="tiny_raydn", data=infos, out_dir=str(out), max_iters=iters, seed=3,
                          workers=0, ckpt_interval=iters, log_interval=1, progress=False,
                          tensorboard=False, device="cpu")
    tr = T.Trainer(opts, info)
    seen, step = [], tr.train_step

    def recording_step(batch):
        seen.extend(m["sample_token"] for m in batch.meta)
        return step(batch)

    tr.train_step = recording_step
    tr.run()
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    searched = bool(tr.step_fn.find_unused_parameters)
    del tr
    gc.collect()  # release DDP (and its reducer) before the next run / leaving the group
    return seen, flat, searched


def main(infos: str, out: str, result: str, iters: int) -> None:
    info = setup_distributed("cpu")
    seen, flat, searched = train(info, infos, Path(out) / "run", iters)
    print(REFERENCE_MARKER, file=sys.stderr, flush=True)
    T._may_leave_parameters_unused = lambda model, dataset: True
    _, ref, _ = train(info, infos, Path(out) / "ref", iters)
    all_seen = [None] * info.world_size
    dist.all_gather_object(all_seen, seen)
    flats = [torch.zeros_like(flat) for _ in range(info.world_size)]
    dist.all_gather(flats, flat)
    if info.is_main:
        Path(result).write_text(json.dumps({
            "world_size": info.world_size, "seen": all_seen, "searched_unused": searched,
            "params_in_sync": all(torch.equal(flats[0], f) for f in flats[1:]),
            "max_abs_diff_vs_reference": float((flat - ref).abs().max()),
            "max_abs_param": float(ref.abs().max())}))
    del flats
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
