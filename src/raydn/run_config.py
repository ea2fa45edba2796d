"""One configuration for any run: a preset plus typed overrides of any field, from a file and ``--set``.

A run is described by one YAML (or JSON) file; ``raydn train`` records it as ``RUN/config.yaml`` and
``raydn train --config RUN/config.yaml`` repeats the run::

    preset: demo_raydn           # the base every other key overrides
    backbone: {...}              # the ModelConfig fields sit at the top level:
    head:                        #   head.denoising.ray.num_rays, head.num_query, image_size, ...
      denoising: {ray: {num_rays: 7}}
    train: {lr: 0.002, aug: {...}}   # the training recipe (raydn.presets.TrainConfig, AugConfig)
    run: {seed: 0, max_iters: null, pretrained: null, ...}   # RunOptions below (incl. initialisation)
    provenance: {...}            # written by raydn (version, command line, ...); ignored when read

A file may hold any subset of the keys. ``--set KEY=VALUE`` (repeatable) uses the same dotted keys,
values read with YAML semantics (``7`` int, ``0.5`` float, ``[1, 2]`` a tuple, ``null`` None,
``true``). **Precedence: preset < config file < --set (in order) < explicit flags** (``--lr``,
``--epochs``, ``--seed``, ``--max-iters``, ``--batch-per-gpu``, ``--amp``, ``--no-ray-dn``,
``--query-groups``, ``--pretrained``, ``--load-from``, ``--from-scratch``). Values are checked against the dataclass field types; an unknown key is
reported with the nearest valid one (:mod:`difflib`).

Library: OmegaConf structured configs (``omegaconf>=2.4``). From 2.4 it builds the frozen
dataclasses back (``OmegaConf.to_object``) with tuple fields as tuples (its ``TupleConfig``; 2.3 gave
lists and refused frozen dataclasses), converts and checks scalars against the field types, and its
dotlist parser gives ``--set`` YAML semantics. dacite / cattrs only structure dicts (no dotted
overrides, no YAML values, cattrs' default ``int(7.9)`` silently truncates) and jsonargparse would
own the whole command line; the key check, the one-line messages and the provenance are ours.

What is *not* part of the configuration (free to change between runs and on resume, results equal):
the data paths (recorded in ``provenance``), ``--workers``, ``--log-interval``, ``--ckpt-interval``,
``--keep-last``, ``--no-progress``, ``--device``, ``--stem-cache`` (equal results), ``--time-budget``
(machine-dependent length: the length it gave is in the checkpoint's schedule) and ``--stop-after``.
A resume compares everything else except the initialisation (:data:`RESUME_IGNORED`).
"""
from __future__ import annotations

import difflib
import json
import shlex
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raydn import __version__
from raydn.config import ModelConfig
from raydn.errors import ConfigError
from raydn.presets import Preset, TrainConfig, get_preset, model_transform

#: the top-level keys that are not ModelConfig fields
SECTIONS = ("preset", "train", "run", "provenance")
AMP_CHOICES = ("fp16", "bf16", "none")


@dataclass(frozen=True)
class RunOptions:
    """The options of :class:`raydn.engine.train.TrainOptions` that change a run's results (the
    recipe's own knobs, lr / epochs / grad_checkpoint, are ``train.*``). ``batch_per_gpu`` None: the
    recipe's total batch / processes; ``max_iters`` None: the recipe's epochs; ``amp`` None: the
    recipe's autocast on GPU, none on CPU. ``pretrained`` / ``load_from`` / ``from_scratch``: the
    initialisation of a fresh run (``--pretrained`` / ``--load-from`` / ``--from-scratch``; paths
    as given, relative to the working directory); a resume ignores them (:data:`RESUME_IGNORED`)."""
    seed: int = 0
    batch_per_gpu: int | None = None
    max_iters: int | None = None
    amp: str | None = None
    pretrained: str | None = None
    load_from: str | None = None
    from_scratch: bool = False


#: keys a resume does not compare: the initialisation applies to a fresh run only (the weights of a
#: resumed run come from its checkpoint)
RESUME_IGNORED = ("run.pretrained", "run.load_from", "run.from_scratch")


@dataclass(frozen=True)
class RunConfig:
    """A resolved configuration: the preset it starts from, the model, the recipe, the run options."""
    preset: str
    model: ModelConfig
    train: TrainConfig
    run: RunOptions = field(default_factory=RunOptions)

    def to_preset(self) -> Preset:
        """The preset with this model and recipe (name and provenance of the base preset kept)."""
        return replace(get_preset(self.preset), model=self.model, train=self.train)

    def as_dict(self) -> dict:
        """Plain YAML/JSON-ready tree in the file layout (tuples as lists)."""
        return {"preset": self.preset, **to_plain(self.model), "train": to_plain(self.train),
                "run": to_plain(self.run)}


def to_plain(o):
    """Dataclasses -> dicts, tuples -> lists, recursively (JSON / YAML-ready)."""
    if is_dataclass(o) and not isinstance(o, type):
        return {f.name: to_plain(getattr(o, f.name)) for f in fields(o)}
    if isinstance(o, dict):
        return {k: to_plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_plain(v) for v in o]
    return o


# ------------------------------------------------------------------ keys and types
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def valid_keys(preset: str | Preset = "tiny_raydn", leaves_only: bool = False) -> list[str]:
    """Every dotted key a file or ``--set`` may name (sections and nested dataclasses included
    unless ``leaves_only``), in declaration order."""
    base = _base(preset)
    out = ["preset"]

    def walk(obj, prefix):
        for f in fields(obj):
            v = getattr(obj, f.name)
            if is_dataclass(v):
                if not leaves_only:
                    out.append(prefix + f.name)
                walk(v, prefix + f.name + ".")
            else:
                out.append(prefix + f.name)
    walk(base.model, "")
    for name in ("train", "run"):
        if not leaves_only:
            out.append(name)
        walk(getattr(base, name), name + ".")
    return out


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + " or null"
    if tp is tuple or typing.get_origin(tp) is tuple:
        return "a list of numbers"
    return getattr(tp, "__name__", str(tp))


def _unknown(key: str, preset, where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid_keys(preset), n=1, cutoff=0.6)
    hint = f" (did you mean '{near[0]}'?)" if near else " (`raydn config PRESET --list-keys` lists them)"
    source = f" in {where[:-2]}" if where else ""
    return ConfigError(f"unknown key '{key}'{source}{hint}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_tree(tree: dict, obj, prefix: str, preset, where: str) -> None:
    """Check the keys of an override ``tree`` against the dataclass instance ``obj`` and the shape of
    the values (mappings for nested dataclasses, lists of numbers for tuple fields); scalar types
    are checked by OmegaConf when merging."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'top level'}: expected a mapping of "
                          f"{type(obj).__name__} fields, got {tree!r}")
    hints = _hints(type(obj))
    names = {f.name for f in fields(obj)}
    for k, v in tree.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown(key, preset, where)
        current = getattr(obj, k)
        if is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}{key}: expected a mapping of {type(current).__name__} "
                                  f"fields, got {v!r}")
            _check_tree(v, current, key + ".", preset, where)
            continue
        tp = hints[k]
        optional = type(None) in typing.get_args(tp)
        is_tuple = tp is tuple or tuple in typing.get_args(tp)
        if v is None:
            if not optional:
                raise ConfigError(f"{where}{key}: expected {_type_name(tp)}, got null")
        elif is_tuple:
            if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
                raise ConfigError(f"{where}{key}: expected a list of numbers, got {v!r}")
            if isinstance(current, tuple) and current and all(isinstance(x, int) for x in current) \
                    and not all(isinstance(x, int) for x in v):
                raise ConfigError(f"{where}{key}: expected a list of integers, got {v!r}")
        elif isinstance(v, (dict, list)):
            raise ConfigError(f"{where}{key}: expected {_type_name(tp)}, got {v!r}")


def _floats_where_float(new, old):
    """Tuples whose preset value holds floats get float elements (``[-51, 51]`` -> ``(-51.0, 51.0)``)
    so a ``--set`` of whole numbers does not turn a float tensor into an int one."""
    if is_dataclass(new):
        return replace(new, **{f.name: _floats_where_float(getattr(new, f.name), getattr(old, f.name))
                               for f in fields(new) if f.init})
    if isinstance(new, tuple) and isinstance(old, tuple) and any(isinstance(x, float) for x in old):
        return tuple(float(x) for x in new)
    return new


# ------------------------------------------------------------------ reading
def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON configuration file (a mapping; ``provenance`` dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        why = " ".join(str(e).split())
        raise ConfigError(f"--config {path}: not a readable {'JSON' if path.suffix == '.json' else 'YAML'} "
                          f"file ({why[:200]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys (preset, head, train, ...), "
                          f"got {type(data).__name__}")
    data = dict(data)
    data.pop("provenance", None)
    return data


def parse_sets(sets: Sequence[str]) -> list[dict]:
    """``["head.num_query=7", ...]`` -> one nested dict per item, values with YAML semantics."""
    out = []
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                              f"head.denoising.ray.num_rays=7")
        try:
            tree = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key.strip()}={value}"]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"--set {item!r}: cannot read the value ({str(e).splitlines()[0]})") from None
        out.append(tree)
    return out


def _nest(dotted: dict) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *head, last = key.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = value
    return out


def _base(preset: str | Preset) -> RunConfig:
    p = get_preset(preset)
    return RunConfig(preset=p.name, model=p.model, train=p.train, run=RunOptions())


def _merge(base, overlays: list[tuple[dict, str]], prefix: str):
    """Merge ``overlays`` ((tree, where) pairs, in order) into the dataclass ``base``; a new frozen
    instance. Scalar type errors become one-line :class:`ConfigError`\\ s."""
    trees = [t for t, _ in overlays if t]
    if not trees:
        return base
    node = OmegaConf.structured(base)
    for tree, where in overlays:
        if not tree:
            continue
        try:
            node = OmegaConf.merge(node, tree)
        except OmegaConfBaseException as e:
            raise _type_error(base, prefix, e, where) from None
    try:
        new = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise _type_error(base, prefix, e, "") from None
    except (ValueError, TypeError) as e:  # a dataclass's own __post_init__ check (e.g. AugConfig)
        raise ConfigError(f"{prefix.rstrip('.') or 'model'}: {e}") from None
    return _floats_where_float(new, base)


def _type_error(base, prefix: str, e, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    tp = None
    obj = base
    try:
        *parents, last = key.split(".")
        for p in parents:
            obj = getattr(obj, p)
        tp = _hints(type(obj))[last]
    except (AttributeError, KeyError, ValueError):
        pass
    value = getattr(e, "value", None)
    if tp is not None:
        return ConfigError(f"{where}{prefix}{key}: expected {_type_name(tp)}, got {value!r}")
    return ConfigError(f"{where}{prefix}{key}: {str(e).splitlines()[0]}")


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            sets: Sequence[str] = (), flags: dict | None = None) -> tuple[RunConfig, dict]:
    """The configuration of a run: ``preset`` < ``config_file`` < ``sets`` (in order) < ``flags``
    (``{dotted key: value}`` of explicit command-line flags, None values ignored).

    The preset is ``preset`` or else the file's ``preset`` key (both given and different: error).
    Returns ``(RunConfig, provenance)``; provenance names the preset, file, --set list and flags."""
    file_tree = load_config_file(config_file) if config_file is not None else {}
    return _resolve(preset, file_tree, config_file, sets, flags)


def _resolve(preset, file_tree: dict, config_file, sets, flags) -> tuple[RunConfig, dict]:
    where_file = f"{config_file}: " if config_file is not None else ""
    named = file_tree.pop("preset", None)
    if named is not None and not isinstance(named, str):
        raise ConfigError(f"{where_file}preset: expected a preset name, got {named!r}")
    if preset is not None and named is not None and named != preset:
        raise ConfigError(f"--preset {preset} differs from 'preset: {named}' in {config_file}; "
                          f"give one of them")
    name = preset or named
    if name is None:
        raise ConfigError("no preset: give --preset NAME or a --config file with a 'preset:' key "
                          "(see `raydn presets`)")
    base = _base(name)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    overlays = [(file_tree, where_file)]
    overlays += [(tree, "") for tree in parse_sets(sets)]
    overlays.append((_nest(flags), ""))
    for tree, where in overlays:
        if "preset" in tree:
            raise ConfigError(f"{where}'preset' cannot be overridden here; give --preset or the "
                              f"file's 'preset:' key")
        for section in ("train", "run"):
            if section in tree:
                _check_tree(tree[section], getattr(base, section), section + ".", name, where)
        model_part = {k: v for k, v in tree.items() if k not in SECTIONS}
        _check_tree(model_part, base.model, "", name, where)
        if "provenance" in tree:
            raise ConfigError(f"{where}'provenance' is written by raydn and cannot be set")
    model = _merge(base.model, [({k: v for k, v in t.items() if k not in SECTIONS}, w)
                                for t, w in overlays], "")
    train = _merge(base.train, [(t.get("train", {}), w) for t, w in overlays], "train.")
    run = _merge(base.run, [(t.get("run", {}), w) for t, w in overlays], "run.")
    derived = model_transform(model, train.aug)   # input size / mean / std: stated in the model
    for key, attr in (("image_size", "final_dim"), ("img_mean", "img_mean"), ("img_std", "img_std")):
        if getattr(train.aug, attr) != getattr(derived, attr) and any(
                attr in t.get("train", {}).get("aug", {}) for t, _ in overlays):
            raise ConfigError(f"train.aug.{attr}: {list(getattr(train.aug, attr))} differs from the "
                              f"model's {key} {list(getattr(model, key))}; set {key} (the transform "
                              f"derives train.aug.{attr} from it)")
    train = replace(train, aug=derived)
    rc = RunConfig(preset=name, model=model, train=train, run=run)
    check_values(rc)
    provenance = {"preset": name, "config_file": None if config_file is None else str(config_file),
                  "set": list(sets), "flags": {k: to_plain(v) for k, v in flags.items()}}
    return rc, provenance


def check_values(rc: RunConfig) -> None:
    """Value checks the field types cannot express (choices)."""
    if rc.train.amp not in AMP_CHOICES:
        raise ConfigError(f"train.amp: expected one of {', '.join(AMP_CHOICES)}, got {rc.train.amp!r}")
    if rc.run.amp is not None and rc.run.amp not in AMP_CHOICES:
        raise ConfigError(f"run.amp: expected one of {', '.join(AMP_CHOICES)} or null, got {rc.run.amp!r}")
    for key, v in (("run.batch_per_gpu", rc.run.batch_per_gpu), ("run.max_iters", rc.run.max_iters)):
        if v is not None and v < 1:
            raise ConfigError(f"{key}: expected a positive integer or null, got {v}")
    if rc.model.head.query_groups < 1:
        raise ConfigError(f"head.query_groups: expected >= 1, got {rc.model.head.query_groups}")
    d = rc.model.depth
    if not d.levels or any(not 0 <= int(v) < rc.model.head.num_levels for v in d.levels):
        raise ConfigError(f"depth.levels: expected level indices in [0, {rc.model.head.num_levels}), got {list(d.levels)}")
    if not 0 < d.min_depth < d.max_depth or d.loss_weight < 0 or d.equal_focal <= 0:
        raise ConfigError(f"depth: expected 0 < min_depth < max_depth, loss_weight >= 0 and equal_focal > 0, "
                          f"got {d.min_depth}, {d.max_depth}, {d.loss_weight}, {d.equal_focal}")


# ------------------------------------------------------------------ training options <-> config
def from_train_options(opts, preset: Preset | None = None) -> RunConfig:
    """The configuration a :class:`raydn.engine.train.TrainOptions` trains (``model_overrides``,
    ``lr``, ``epochs``, ``grad_checkpoint`` folded into the model and recipe)."""
    p = preset if preset is not None else get_preset(opts.preset)
    model = replace(p.model, **opts.model_overrides) if opts.model_overrides else p.model
    train = p.train
    recipe = {k: getattr(opts, k) for k in ("lr", "epochs", "grad_checkpoint") if getattr(opts, k) is not None}
    if recipe:
        train = replace(train, **recipe)
    return RunConfig(preset=p.name, model=model, train=train,
                     run=RunOptions(seed=opts.seed, batch_per_gpu=opts.batch_per_gpu,
                                    max_iters=opts.max_iters, amp=opts.amp,
                                    pretrained=getattr(opts, "pretrained", None),
                                    load_from=getattr(opts, "load_from", None),
                                    from_scratch=bool(getattr(opts, "from_scratch", False))))


def train_options_kwargs(rc: RunConfig) -> dict:
    """The :class:`~raydn.engine.train.TrainOptions` fields that carry ``rc``."""
    return dict(preset=rc.to_preset(), seed=rc.run.seed, batch_per_gpu=rc.run.batch_per_gpu,
                max_iters=rc.run.max_iters, amp=rc.run.amp, pretrained=rc.run.pretrained,
                load_from=rc.run.load_from, from_scratch=rc.run.from_scratch)


# ------------------------------------------------------------------ writing, comparing
def dump_yaml(rc: RunConfig, provenance: dict | None = None) -> str:
    """The file form of ``rc`` (loadable with ``--config``); ``provenance`` appended if given."""
    tree = rc.as_dict()
    if provenance:
        tree["provenance"] = to_plain(provenance)
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=100)


def load_run_config(text: str, where: str) -> RunConfig:
    """A :class:`RunConfig` from the YAML ``text`` of a recorded configuration (``where``: its file,
    for messages)."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not a readable YAML file ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(tree).__name__}")
    tree = dict(tree)
    tree.pop("provenance", None)
    return _resolve(None, tree, where, (), None)[0]


def provenance_now(extra: dict | None = None) -> dict:
    """Version and command line of this process, plus ``extra``."""
    return {"raydn_version": __version__, "command": shlex.join(sys.argv), **(extra or {})}


def flatten(rc: RunConfig) -> dict[str, Any]:
    """``{dotted key: plain value}`` of every leaf."""
    out = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v
    walk(rc.as_dict(), "")
    return out


def differences(recorded: RunConfig, requested: RunConfig, ignore: Sequence[str] = ()
                ) -> list[tuple[str, Any, Any]]:
    """``[(key, recorded value, requested value)]`` of the leaves that differ, in declaration order
    (keys in ``ignore`` left out; a resume passes :data:`RESUME_IGNORED`)."""
    a, b = flatten(recorded), flatten(requested)
    order = {k: i for i, k in enumerate(valid_keys(leaves_only=True))}
    keys = sorted(a.keys() | b.keys(), key=lambda k: (order.get(k, len(order)), k))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and k not in ignore]


def show_value(v) -> str:
    """A plain value as YAML writes it in flow style (null, true, [1, 2])."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    return str(v)


def mismatch_message(diffs, where: str, recorded_file, limit: int = 8) -> str:
    """One line: ``--resume: WHERE records another configuration than the one requested:
    head.num_query: folder 100, requested 200; ... (what to do)``; ``recorded_file``: the run
    folder's ``config.yaml`` (the way to resume with the recorded configuration)."""
    shown = "; ".join(f"{k}: folder {show_value(a)}, requested {show_value(b)}" for k, a, b in diffs[:limit])
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    schedule = any(k in ("run.max_iters", "train.epochs") for k, _, _ in diffs)
    hint = ("a resumed run keeps the schedule it was started with (its cosine ends at its own last "
            "iteration); to train longer start a new run in another --out" if schedule else
            f"resume with the run's own configuration (--config {recorded_file}) or start a new run in "
            "another --out")
    return f"--resume: {where} records another configuration than the one requested: {shown}{more} ({hint})"
