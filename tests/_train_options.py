"""``train_options``: the TrainOptions of a short CPU training run in the tests (one home for the
builder the engine / reliability tests and their subprocess workers share)."""
from __future__ import annotations

import os

from raydn.engine.train import TrainOptions

# tiny preset, 6 iterations, no data-loader processes, no checkpoint unless asked, a log line per
# iteration, no progress bar / TensorBoard, CPU
TEST_RUN = dict(preset="tiny_raydn", max_iters=6, seed=7, workers=0, ckpt_interval=1000, log_interval=1,
                progress=False, tensorboard=False, device="cpu")


def train_options(infos, out, **overrides) -> TrainOptions:
    """``TEST_RUN`` with ``overrides`` on top.

    Args:
        infos: an info pickle (path), or the ``synth_infos`` fixture value ``(folder, {split: path})``,
            of which the train split is used.
        out: the run folder (``out_dir``).
    """
    data = infos if isinstance(infos, (str, os.PathLike)) else infos[1]["train"]
    return TrainOptions(**{**TEST_RUN, "data": str(data), "out_dir": str(out), **overrides})
