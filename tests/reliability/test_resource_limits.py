"""Size limits before allocation: a few crafted bytes of info pickle, built only from what the
restricted unpickler allows, are refused at once with a clear message and little memory (no
``bytearray(2**31)``, ``list(range(...))``, array of a huge shape, or numpy crash on an object array
whose data is shorter than its shape); files larger than any real one are refused before reading.

The crafted pickles are loaded in a subprocess that reports its peak RSS growth (and so that a
numpy crash fails the test instead of killing pytest)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import raydn.data.infos as infos_mod
from raydn.cli import main as cli_main
from raydn.data.infos import load_info_file, loads_infos
from raydn.errors import DataError


def _reduce(module: bytes, name: bytes, *args: bytes) -> bytes:
    """Protocol-2 opcodes for ``module.name(*args)`` (each arg already an opcode sequence)."""
    return b"c" + module + b"\n" + name + b"\n(" + b"".join(args) + b"tR"


def _int(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little", signed=True)


def _info(value: bytes) -> bytes:
    """``{'infos': value}`` as a protocol-2 pickle."""
    return b"\x80\x02}X\x05\x00\x00\x00infos" + value + b"s."


GiB = 1 << 30
CRAFTED = {
    # the case: a ~80-byte info file whose one constructor asks for 2 GiB
    "bytearray": _info(_reduce(b"__builtin__", b"bytearray", _int(2 * GiB - 1))),
    "bytes": _info(_reduce(b"__builtin__", b"bytes", _int(GiB))),
    # 2**24 int objects and an 8-byte slot each: ~600 MB without the limit
    "list(range)": _info(_reduce(b"__builtin__", b"list", _reduce(b"__builtin__", b"range", _int(1 << 24)))),
    # an array of 2**31 bytes (numpy's own reconstruction helper)
    "_reconstruct": _info(_reduce(b"numpy.core.multiarray", b"_reconstruct", b"cnumpy\nndarray\n",
                                  b"(" + _int(2 * GiB - 1) + b"tU\x01b")),
    # numpy.ndarray(shape, 'O') allocates (and fills) the object slots
    "ndarray()": _info(_reduce(b"numpy", b"ndarray", b"(" + _int(1 << 27) + b"tU\x01O")),
}


def _object_array_short_data() -> bytes:
    """A real pickle of a 3-element object array, edited to give one element (numpy segfaults)."""
    good = pickle.dumps({"infos": [np.array([1, 2, 3], dtype=object)]}, protocol=2)
    bad = good.replace(b"K\x01K\x02K\x03e", b"K\x01e")
    assert bad != good
    return bad


CRAFTED["object array"] = _object_array_short_data()

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from raydn.data.infos import loads_infos
    from raydn.errors import DataError
    data = bytes.fromhex(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    try:
        loads_infos(data, "crafted.pkl")
        msg = None
    except DataError as e:
        msg = str(e)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0
    print(json.dumps({"error": msg, "rss_growth_mb": grown, "seconds": time.time() - t0}))
""")


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_info_pickle_is_refused_quickly_with_little_memory(name):
    data = CRAFTED[name]
    assert len(data) < 300
    proc = subprocess.run([sys.executable, "-c", _CHILD, data.hex()], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{name}: the loader died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] is not None, f"{name}: accepted"
    assert out["error"].startswith("crafted.pkl: ") and "\n" not in out["error"]
    assert out["rss_growth_mb"] < 100, out
    assert out["seconds"] < 5, out


def test_the_budget_message_says_what_and_how_much():
    with pytest.raises(DataError, match=r"crafted\.pkl: refusing to decode: bytearray\(\.\.\.\) would allocate "
                                        r"2\.0 GiB .* more than a file of \d+ bytes can hold"):
        loads_infos(CRAFTED["bytearray"], "crafted.pkl")


def test_memo_reuse_cannot_multiply_an_allocation():
    """A 1024-item list kept in the pickle memo and copied 4000 times by ``list(...)``: each copy is
    charged, so 90 kB of pickle may not allocate 32 MB (16 MiB + 16 bytes per byte of file)."""
    items = b"(" + b"N" * 1024 + b"l"          # a 1024-element list
    body = items + b"q\x01" + b"(" + (b"c__builtin__\nlist\n(h\x01tR" * 4000) + b"l"
    data = _info(body)
    assert len(data) < 100_000
    with pytest.raises(DataError, match="refusing to decode: list"):
        loads_infos(data, "memo.pkl")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_info_pickles_still_load_as_plain_arrays(protocol):
    """What real info files hold (numpy arrays incl. Fortran order, strings, object arrays, structured
    dtypes, numpy scalars, defaultdict/OrderedDict, sets, bytes) round-trips, as plain ndarrays."""
    import collections
    rec = {"a": np.arange(6.0).reshape(2, 3), "f": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
           "names": np.array(["car", "pedestrian"]), "o": np.array([1, "x", None, np.arange(3)], dtype=object),
           "st": np.zeros(3, dtype=[("x", "f4"), ("y", "i2")]), "e": np.zeros((0, 7)),
           "s": (np.float32(1.5), np.int64(3)), "dd": collections.defaultdict(list, {"k": [1]}),
           "od": collections.OrderedDict(a=1), "set": {1, 2}, "b": b"xyz"}
    out = loads_infos(pickle.dumps({"infos": [rec], "metadata": {}}, protocol=protocol), "ok.pkl")["infos"][0]
    for k in ("a", "f", "names", "st", "e"):
        assert type(out[k]) is np.ndarray and out[k].dtype == rec[k].dtype
        np.testing.assert_array_equal(out[k], rec[k])
    assert type(out["o"]) is np.ndarray and type(out["o"][3]) is np.ndarray and out["o"][1] == "x"
    assert out["s"] == rec["s"] and type(out["s"][0]) is np.float32
    assert out["dd"] == rec["dd"] and out["dd"].default_factory is list
    assert out["od"] == rec["od"] and out["set"] == rec["set"] and out["b"] == rec["b"]


def test_info_file_larger_than_the_limit_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    path = tmp_path / "infos.pkl"
    path.write_bytes(pickle.dumps({"infos": [], "metadata": {}}) + b"\0" * 4096)
    monkeypatch.setattr(infos_mod, "MAX_INFO_FILE_BYTES", 1024)
    read = []
    monkeypatch.setattr(type(path), "read_bytes", lambda self: read.append(self) or b"")
    with pytest.raises(DataError, match=r"infos\.pkl: info file of 4\.\d KiB is larger than the limit of 1\.0 KiB"):
        load_info_file(path)
    assert read == []


def test_raydn_train_refuses_the_crafted_info_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "infos.pkl"
    path.write_bytes(CRAFTED["bytearray"])
    rc = cli_main(["train", "--preset", "tiny_raydn", "--data", str(path), "--out", str(tmp_path / "run"),
                   "--max-iters", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("raydn train: error: ") and "refusing to decode" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
