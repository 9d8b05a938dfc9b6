"""Fuzzing the model loader: headstart.json with fields removed, retyped or out of range, random bytes in its
place, and model.safetensors with mutated bytes or a mutated header. Loading either succeeds or raises
ArtifactError (one line); any other exception is a failure. Bounded: a fixed number of examples, derandomized
(the same cases every run), 500 cases in about 15 s once the tiny backbone's weights exist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers_cli import assert_one_line  # noqa: E402
from test_serve_artifact import synthetic_artifact  # noqa: E402

from headstart import ImageClassifier  # noqa: E402
from headstart.errors import ArtifactError  # noqa: E402
from headstart.heads.config import head_logits_numpy  # noqa: E402
from headstart.serve import artifact  # noqa: E402
from headstart.serve.artifact import META_FILE, WEIGHTS_FILE  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
N_CASES = {"json": 0, "bytes": 0, "weights": 0, "header": 0, "tensors": 0}  # how many each test ran (printed with -s)


@pytest.fixture(scope="module")
def valid(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, bytes]:
    """A valid model directory, its headstart.json and its model.safetensors bytes."""
    src = artifact.save(synthetic_artifact(tiny_weights, hidden=(8,)), tmp_path_factory.mktemp("fuzz") / "valid")
    return src, json.loads((src / META_FILE).read_text()), (src / WEIGHTS_FILE).read_bytes()


@pytest.fixture(scope="module")
def scratch(valid, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory the examples overwrite in turn (a fresh copy per example would cost more than the load)."""
    d = tmp_path_factory.mktemp("fuzz-scratch") / "model"
    shutil.copytree(valid[0], d)
    return d


def _load_or_refuse(model_dir: Path) -> None:
    """The property: a model loads and its head runs (probabilities of the record's shape, no exception), or
    ArtifactError says in one line why not. Anything else propagates."""
    try:
        art = artifact.load(model_dir, with_backbone=True)
    except ArtifactError as exc:
        assert_one_line(str(exc))
        return
    cfg = art.record.head
    with np.errstate(all="ignore"):  # finite but huge mutated weights may overflow: that is not the property
        logits = head_logits_numpy(art.head_state, cfg, np.zeros((2, cfg.in_features), np.float32))
    assert logits.shape == (2, len(art.record.classes))
    clf = ImageClassifier.load(model_dir)
    assert clf.classes_ == list(art.record.classes)


# --- headstart.json -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated_meta(draw, meta: dict) -> dict:
    meta = json.loads(json.dumps(meta))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(meta)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["remove", "replace", "scale"]))
        if action == "remove":
            del parent[path[-1]]
        elif action == "scale" and isinstance(parent[path[-1]], (int, float)) and not isinstance(parent[path[-1]], bool):
            parent[path[-1]] = parent[path[-1]] * draw(st.sampled_from([-1, 0, 2, 10**6, 1e300]))
        else:
            parent[path[-1]] = draw(json_values)
    return meta


def test_fuzz_mutated_metadata(valid, scratch):
    _, meta, weights = valid
    (scratch / WEIGHTS_FILE).write_bytes(weights)

    @FUZZ
    @given(mutated_meta(meta))
    def check(edited: dict) -> None:
        N_CASES["json"] += 1
        (scratch / META_FILE).write_text(json.dumps(edited))  # NaN and Infinity as Python's json writes them
        _load_or_refuse(scratch)

    check()
    print("fuzz cases (metadata):", N_CASES["json"])


def test_fuzz_random_bytes_as_metadata(valid, scratch):
    (scratch / WEIGHTS_FILE).write_bytes(valid[2])

    @FUZZ
    @given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
    def check(data: bytes) -> None:
        N_CASES["bytes"] += 1
        (scratch / META_FILE).write_bytes(data)
        _load_or_refuse(scratch)

    check()


# --- model.safetensors ----------------------------------------------------------------------------------------

@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """Overwritten, inserted or deleted bytes, mostly in the header (where a parser can go wrong), or a cut."""
    buf = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little")
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, header_end + 64) | st.integers(0, len(buf) - 1))
        where = min(where, len(buf) - 1)
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        if kind == "set":
            buf[where] = draw(st.integers(0, 255))
        elif kind == "insert":
            buf[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[where:where + draw(st.integers(1, 8))]
        else:
            del buf[where:]
        if not buf:
            break
    return bytes(buf)


@st.composite
def mutated_header(draw, data: bytes) -> bytes:
    """A well-formed safetensors file whose header lies: dtypes, shapes or offsets changed, tensors renamed."""
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "name"]))
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(["F16", "F64", "I64", "U8", "BOOL", "BF16", "X9"]))
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(0, 2**40), max_size=4))
        elif field == "data_offsets":
            header[name]["data_offsets"] = draw(st.lists(st.integers(-5, len(body) + 100), min_size=0, max_size=3))
        else:
            header[draw(st.sampled_from(["head.mean", "head.layers.9.weight", "backbone.x", "other"]))] = header.pop(name)
            names = [k for k in header if k != "__metadata__"]
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def test_fuzz_mutated_weights(valid, scratch):
    _, meta, weights = valid
    (scratch / META_FILE).write_text(json.dumps(meta))

    @FUZZ
    @given(mutated_bytes(weights))
    def check(data: bytes) -> None:
        N_CASES["weights"] += 1
        (scratch / WEIGHTS_FILE).write_bytes(data)
        _load_or_refuse(scratch)

    check()


def test_fuzz_lying_weights_header(valid, scratch):
    _, meta, weights = valid
    (scratch / META_FILE).write_text(json.dumps(meta))

    @FUZZ
    @given(mutated_header(weights))
    def check(data: bytes) -> None:
        N_CASES["header"] += 1
        (scratch / WEIGHTS_FILE).write_bytes(data)
        _load_or_refuse(scratch)

    check()


@st.composite
def mutated_tensors(draw, data: bytes) -> bytes:
    """A well-formed safetensors file whose tensors do not fit the record: dropped, sliced, reshaped, renamed,
    retyped, or holding NaN and infinities (the shape of a head trained for other classes, or diverged)."""
    from safetensors.numpy import load, save

    tensors = load(data)
    head = sorted(k for k in tensors if k.startswith("head."))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(head + ["backbone.conv_stem.weight", "backbone.bn1.running_var"]))
        if name not in tensors:
            continue
        t = tensors[name]
        kind = draw(st.sampled_from(["drop", "slice", "flatten", "rename", "retype", "nan", "inf", "zero"]))
        if kind == "drop":
            del tensors[name]
        elif kind == "slice" and t.shape and t.shape[0] > 1:
            tensors[name] = np.ascontiguousarray(t[: draw(st.integers(1, t.shape[0] - 1))])
        elif kind == "flatten":
            tensors[name] = t.reshape(-1)
        elif kind == "rename":
            tensors[draw(st.sampled_from(["head.layers.7.weight", "head.extra", "head.layers.2.bias"]))] = t
            del tensors[name]
        elif kind == "retype":
            tensors[name] = t.astype(draw(st.sampled_from([np.float16, np.float64, np.int32, np.uint8])))
        elif t.size:
            flat = t.astype(np.float32).reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = {"nan": np.nan, "inf": np.inf, "zero": 0.0}[kind]
            tensors[name] = flat.reshape(t.shape)
    return save(tensors)


def test_fuzz_tensors_that_do_not_fit_the_record(valid, scratch):
    _, meta, weights = valid
    (scratch / META_FILE).write_text(json.dumps(meta))

    @FUZZ
    @given(mutated_tensors(weights))
    def check(data: bytes) -> None:
        N_CASES["tensors"] += 1
        (scratch / WEIGHTS_FILE).write_bytes(data)
        _load_or_refuse(scratch)

    check()
    print("fuzz cases run:", N_CASES)


def test_the_valid_model_still_loads(valid):
    art = artifact.load(valid[0])
    assert np.isfinite(art.head_state["mean"]).all()
