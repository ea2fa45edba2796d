"""One configuration for any run (raydn.run_config, `raydn config`): keys, types, tuples, Optional,
precedence, YAML round trip of every preset, the CLI output. No training here (see
tests/engine/test_resume_config.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from raydn.cli import main as cli_main
from raydn.config import HeadConfig, ModelConfig
from raydn.errors import ConfigError, RaydnError
from raydn.presets import TrainConfig, get_preset, list_presets
from raydn.run_config import (RESUME_IGNORED, differences, dump_yaml, flatten, load_run_config,
                              mismatch_message, resolve, valid_keys)


def test_unknown_key_suggests_the_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve("tiny_raydn", sets=["head.denoising.ray.num_ray=7"])
    assert str(e.value) == ("unknown key 'head.denoising.ray.num_ray' "
                            "(did you mean 'head.denoising.ray.num_rays'?)")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.aug\.rot_rnage' \(did you mean 'train\.aug\.rot_range'\?\)"):
        resolve("tiny_raydn", sets=["train.aug.rot_rnage=[0, 0]"])
    f = tmp_path / "abl.yaml"
    f.write_text("head:\n  num_querys: 7\n")
    with pytest.raises(ConfigError) as e:
        resolve("tiny_raydn", config_file=f)
    assert str(e.value) == f"unknown key 'head.num_querys' in {f} (did you mean 'head.num_query'?)"
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'zzz'.*--list-keys"):   # nothing close: how to list them
        resolve("tiny_raydn", sets=["zzz=1"])


@pytest.mark.parametrize("item, message", [
    ("head.num_query=abc", "head.num_query: expected int, got 'abc'"),
    ("head.num_query=7.5", "head.num_query: expected int, got 7.5"),
    ("head.denoising.ray.alpha=x", "head.denoising.ray.alpha: expected float, got 'x'"),
    ("use_grid_mask=maybe", "use_grid_mask: expected bool, got 'maybe'"),
    ("image_size=7", "image_size: expected a list of numbers, got 7"),
    ("image_size=[128.5, 352]", "image_size: expected a list of integers, got [128.5, 352]"),
    ("head.nms_radius=[a, b]", "head.nms_radius: expected a list of numbers, got ['a', 'b']"),
    ("head=5", "head: expected a mapping of HeadConfig fields, got 5"),
    ("head.num_query.x=1", "head.num_query: expected int, got {'x': 1}"),
    ("run.seed=null", "run.seed: expected int, got null"),
    ("train.amp=fp32", "train.amp: expected one of fp16, bf16, none, got 'fp32'"),
    ("run.max_iters=0", "run.max_iters: expected a positive integer or null, got 0"),
    ("train.aug.resize_lim=[0.9, 0.1]", "train: AugConfig.resize_lim must be 0 < lo <= hi, got (0.9, 0.1)"),
    ("no_equals_sign", "--set 'no_equals_sign': expected KEY=VALUE"),
])
def test_wrong_types_give_one_line_errors(item, message):
    with pytest.raises(ConfigError) as e:
        resolve("tiny_raydn", sets=[item])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, RaydnError)  # the CLI prints it as `raydn CMD: error: ...`, exit 2


def test_values_have_yaml_semantics_and_keep_tuples_optional_and_frozen_dataclasses():
    rc, _ = resolve("demo_raydn", sets=[
        "head.denoising.ray.num_rays=7", "head.denoising.ray.alpha=4", "train.lr=1e-3",
        "image_size=[64, 176]", "head.nms_radius=null", "backbone.pretrained=null",
        "head.pc_range=[-40, -40, -5, 40, 40, 3]", "backbone.window_block_indexes=[0, 2]",
        "train.aug.rand_flip=true", "run.amp=bf16"])
    m = rc.model
    assert m.head.denoising.ray.num_rays == 7 and type(m.head.denoising.ray.num_rays) is int
    assert m.head.denoising.ray.alpha == 4.0 and type(m.head.denoising.ray.alpha) is float
    assert rc.train.lr == 1e-3 and rc.train.aug.rand_flip is True and rc.run.amp == "bf16"
    assert m.image_size == (64, 176) and type(m.image_size) is tuple
    assert m.head.nms_radius is None and m.backbone.pretrained is None          # Optional -> None
    # whole numbers in a float tuple stay floats (no int tensor where the preset has a float one)
    assert m.head.pc_range == (-40.0, -40.0, -5.0, 40.0, 40.0, 3.0)
    assert all(type(x) is float for x in m.head.pc_range)
    assert m.backbone.window_block_indexes == (0, 2)
    assert type(m) is ModelConfig and type(m.head) is HeadConfig and type(rc.train) is TrainConfig
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.head.num_query = 3
    # everything not named is the preset's
    demo = get_preset("demo_raydn")
    assert m.neck == demo.model.neck and m.aux_head == demo.model.aux_head
    assert m.head.loss == demo.model.head.loss and m.head.num_query == demo.model.head.num_query
    assert rc.to_preset().model == m and rc.to_preset().name == "demo_raydn"
    assert rc.to_preset().provenance == demo.provenance
    # a tuple Optional set to a value on a preset where it is None
    rc2, _ = resolve("tiny_raydn", sets=["head.nms_radius=[1, 2.5]"])
    assert rc2.model.head.nms_radius == (1, 2.5)


def test_precedence_preset_file_set_flags(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("preset: tiny_raydn\nhead:\n  num_query: 50\n  denoising: {ray: {num_rays: 3, radius: 2.0}}\n"
                 "train: {lr: 0.001, epochs: 4}\nrun: {seed: 5, max_iters: 9}\n")
    rc, prov = resolve(config_file=f, sets=["head.denoising.ray.num_rays=4", "head.num_query=60",
                                             "head.num_query=70"],
                       flags={"run.seed": 9, "train.lr": None, "head.denoising.ray.enabled": False})
    ray = rc.model.head.denoising.ray
    assert rc.preset == "tiny_raydn"                          # from the file
    assert ray.radius == 2.0 and rc.train.epochs == 4          # file over preset
    assert ray.num_rays == 4 and rc.model.head.num_query == 70  # --set over file, later --set wins
    assert rc.run.seed == 9 and ray.enabled is False            # flags over everything
    assert rc.train.lr == 0.001 and rc.run.max_iters == 9       # a flag left None does not count
    assert rc.model.head.embed_dims == get_preset("tiny_raydn").model.head.embed_dims  # preset
    assert prov["config_file"] == str(f) and prov["set"][0] == "head.denoising.ray.num_rays=4"
    assert prov["flags"] == {"run.seed": 9, "head.denoising.ray.enabled": False}
    # the same file with --preset naming another preset: refused, not silently mixed
    with pytest.raises(ConfigError, match="--preset demo_raydn differs from 'preset: tiny_raydn'"):
        resolve("demo_raydn", config_file=f)
    with pytest.raises(ConfigError, match="no preset"):
        resolve(sets=["head.num_query=3"])
    with pytest.raises(ConfigError, match="'preset' cannot be overridden"):
        resolve("tiny_raydn", sets=["preset=demo_raydn"])


@pytest.mark.parametrize("name", list_presets())
def test_yaml_round_trip_of_every_preset(name, tmp_path):
    """resolve -> dump -> load -> the same frozen dataclasses (floats, tuples, None exact)."""
    rc, prov = resolve(name)
    p = get_preset(name)
    assert rc.model == p.model and rc.train == p.train
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(rc, {**prov, "command": "raydn train ..."}))
    back, _ = resolve(config_file=path)
    assert back == rc and differences(back, rc) == []
    assert back.to_preset() == p
    assert load_run_config(path.read_text(), str(path)) == rc
    # JSON files are read too
    js = tmp_path / "config.json"
    js.write_text(json.dumps(rc.as_dict()))
    assert resolve(config_file=js)[0] == rc


def test_bad_config_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve(config_file=tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of keys"):
        resolve(config_file=tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("head: {num_query: [\n")
    with pytest.raises(ConfigError) as e:
        resolve(config_file=tmp_path / "broken.yaml")
    assert "not a readable YAML file" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "typed.yaml").write_text("preset: tiny_raydn\ntrain: {aug: {rand_flip: sometimes}}\n")
    with pytest.raises(ConfigError, match=r"typed.yaml: train.aug.rand_flip: expected bool, got 'sometimes'"):
        resolve(config_file=tmp_path / "typed.yaml")


def test_differences_list_the_keys_in_one_line():
    a, _ = resolve("tiny_raydn")
    b, _ = resolve("tiny_repdetr3d", sets=["head.num_query=200"])
    diffs = differences(a, b)
    assert [d[0] for d in diffs] == ["preset", "head.num_query", "head.denoising.ray.enabled"]
    msg = mismatch_message(diffs, "RUN/latest.pt", "RUN/config.yaml")
    assert "head.num_query: folder 100, requested 200" in msg
    assert "head.denoising.ray.enabled: folder true, requested false" in msg
    assert "preset: folder tiny_raydn, requested tiny_repdetr3d" in msg and "\n" not in msg
    assert "--config RUN/config.yaml" in msg


def test_a_resume_does_not_compare_the_initialisation():
    """--pretrained / --load-from / --from-scratch are recorded (a repeat from config.yaml loads the
    same weights) but a resume ignores them: its weights come from the checkpoint."""
    fresh, _ = resolve("r50_raydn", flags={"run.pretrained": "ckpts/nuim_r50.pth", "run.max_iters": 10})
    assert fresh.run.pretrained == "ckpts/nuim_r50.pth"
    resumed, _ = resolve("r50_raydn", flags={"run.max_iters": 10})
    assert [d[0] for d in differences(fresh, resumed)] == ["run.pretrained"]
    assert differences(fresh, resumed, ignore=RESUME_IGNORED) == []
    longer, _ = resolve("r50_raydn", flags={"run.max_iters": 20, "run.from_scratch": True})
    assert differences(fresh, longer, ignore=RESUME_IGNORED) == [("run.max_iters", 10, 20)]
    assert "keeps the schedule it was started with" in mismatch_message(
        differences(fresh, longer, ignore=RESUME_IGNORED), "RUN/latest.pt", "RUN/config.yaml")


def test_valid_keys_cover_every_leaf():
    rc, _ = resolve("r50_raydn")
    keys = set(valid_keys("r50_raydn", leaves_only=True))
    assert keys == set(flatten(rc))
    assert {"head.denoising.ray.num_rays", "train.aug.rot_range", "run.seed", "image_size"} <= keys


def test_config_command_prints_loadable_yaml(capsys, tmp_path):
    assert cli_main(["config", "demo_raydn", "--set", "head.denoising.ray.num_rays=7",
                     "--set", "head.denoising.ray.enabled=false"]) == 0
    out = capsys.readouterr().out
    tree = yaml.safe_load(out)
    assert tree["preset"] == "demo_raydn" and tree["head"]["denoising"]["ray"]["num_rays"] == 7
    assert tree["head"]["denoising"]["ray"]["enabled"] is False
    # what it prints is a configuration file: loading it gives the same configuration
    path = tmp_path / "printed.yaml"
    path.write_text(out)
    expected, _ = resolve("demo_raydn", sets=["head.denoising.ray.num_rays=7",
                                              "head.denoising.ray.enabled=false"])
    assert resolve(config_file=path)[0] == expected
    assert cli_main(["config", "--config", str(path), "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "head.denoising.ray.num_rays = 7" in lines and "image_size = [128, 352]" in lines
    assert cli_main(["config", "tiny_raydn", "--set", "head.denoising.ray.num_ray=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("raydn config: error: unknown key 'head.denoising.ray.num_ray' "
                   "(did you mean 'head.denoising.ray.num_rays'?)")
    assert cli_main(["config"]) == 2
