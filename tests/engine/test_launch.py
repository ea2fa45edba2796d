"""Local multi-process training (raydn.engine.launch): the demo's 2 x 1-thread data parallelism."""
from functools import partial

import pytest
import torch

from raydn.engine.checkpoint import safe_torch_load
from raydn.engine.launch import default_procs, train_local_processes
from raydn.engine.train import Trainer
from _train_options import train_options


_opts = partial(train_options, max_iters=4, seed=5)


def test_default_procs_is_bounded_by_batch_and_device():
    assert default_procs(2, "cuda") == 1
    assert 1 <= default_procs(2, "cpu") <= 2
    assert default_procs(1, "cpu") == 1


def test_procs_must_be_positive(synth_infos, tmp_path):
    with pytest.raises(ValueError, match="procs"):
        train_local_processes(_opts(synth_infos, tmp_path), 0)


@pytest.mark.slow
def test_two_local_processes_train_the_one_process_schedule(synth_infos, tmp_path):
    """2 spawned gloo processes x 1 sample: the one-process schedule (total batch 2), a checkpoint
    with finite weights that differ from the initial ones, and rank 0's result returned."""
    res = train_local_processes(_opts(synth_infos, tmp_path / "two"), 2, threads_per_proc=1)
    single = Trainer(_opts(synth_infos, tmp_path / "one"))
    assert res["iteration"] == 4 and len(res["history"]) == 4
    assert res["schedule"]["world_size"] == 2 and res["schedule"]["batch_per_gpu"] == 1
    for k in ("total_batch_size", "max_iters", "lr", "warmup_iters"):
        assert res["schedule"][k] == single.schedule.as_dict()[k], k
    state = safe_torch_load(res["checkpoint"], map_location="cpu")["model"]
    init = single.model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    changed = [k for k, v in state.items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(changed) > 10  # the optimiser stepped (same seed, same initial weights)


def test_a_failing_process_raises_here(synth_infos, tmp_path):
    with pytest.raises(Exception, match="train info|not found|No such file|does not exist"):
        train_local_processes(_opts(synth_infos, tmp_path, data=str(tmp_path / "missing.pkl")), 2,
                              threads_per_proc=1)
