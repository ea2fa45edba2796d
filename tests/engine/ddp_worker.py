"""Run by torchrun in tests/engine/test_train.py: 2 processes x 1 sample on gloo; checks that the
parameters are identical on both ranks after a few DDP steps and writes the result (rank 0)."""
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from raydn.engine.distributed import cleanup_distributed, setup_distributed
from raydn.engine.train import Trainer, TrainOptions


def main(infos: str, out: str) -> None:
    info = setup_distributed("cpu")
    opts = TrainOptions(preset="tiny_raydn", data=infos, out_dir=out, epochs=2, seed=3, workers=0,
                        ckpt_interval=1000, log_interval=1, progress=False, tensorboard=False,
                        device="cpu", stop_after=3)
    tr = Trainer(opts, info)
    res = tr.run()
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(info.world_size)]
    dist.all_gather(gathered, flat)
    in_sync = all(torch.equal(gathered[0], g) for g in gathered[1:])
    if info.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "ddp_result.json").write_text(json.dumps({
            "world_size": info.world_size, "params_in_sync": bool(in_sync),
            "iteration": res["iteration"], "schedule": res["schedule"]}))
    del tr, gathered  # release DDP (and its reducer) before the process group goes away
    gc.collect()
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
