"""serve.export and serve.onnx_predictor: the whole classifier as one ONNX file, checked, quantized, and run
without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_cli import cli_env, run_headstart
from helpers_serve import tiny_model

# The README's plain-onnxruntime recipe, run as written: nothing from headstart.
PLAIN_RECIPE = """
import json, sys, numpy as np, onnxruntime as ort
from PIL import Image
s = ort.InferenceSession(sys.argv[1])
meta = json.loads(s.get_modelmeta().custom_metadata_map["headstart"])
img, feeds = Image.open(sys.argv[2]).convert("RGB"), {}
for v in meta["inputs"]:  # resize the short side, centre-crop: uint8 RGB, N x H x W x 3
    k = v["resize"] / min(img.size)
    r = img.resize((max(v["size"], round(img.width * k)), max(v["size"], round(img.height * k))), Image.BICUBIC)
    x, y = (r.width - v["size"]) // 2, (r.height - v["size"]) // 2
    feeds[v["name"]] = np.asarray(r.crop((x, y, x + v["size"], y + v["size"])))[None]
p = s.run(None, feeds)[0][0]
print(meta["classes"][p.argmax()], p.max())
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_weights, tiny_onnx) -> tuple[Path, Path, Path]:
    return tiny_model(tmp_path_factory, tiny_weights, tiny_onnx)


@pytest.fixture(scope="module")
def exported_native(tmp_path_factory, tiny_weights, tiny_onnx) -> tuple[Path, Path, Path]:
    return tiny_model(tmp_path_factory, tiny_weights, tiny_onnx, native=True)


def _torch_reference(model: Path, paths: list[Path]) -> np.ndarray:
    """Probabilities the saved model gives through PyTorch (features) and the head's numpy forward."""
    import torch

    from headstart.heads.config import head_proba
    from headstart.runtime.frozen import FrozenBackbone
    from headstart.serve import artifact
    from headstart.vision.preprocess import load_views

    art = artifact.load(model)
    rec = art.record
    frozen = FrozenBackbone(rec.backbone, model / artifact.WEIGHTS_FILE, rec.backbone_weights_id, "backbone.")
    net = frozen.build_torch()
    views = [load_views(p, rec.backbone.preprocess) for p in paths]
    with torch.no_grad():
        feats = np.concatenate([net(torch.from_numpy(np.stack(v))).numpy() for v in zip(*views)], 1)
    return head_proba(rec.head, art.head_state, feats)


def test_export_is_one_self_describing_file(exported) -> None:
    import onnx

    from headstart import __version__

    model, _, _ = exported
    graph = onnx.load(str(model / "model.onnx"))
    meta = {p.key: p.value for p in graph.metadata_props}
    info = json.loads(meta["headstart"])
    assert json.loads(meta["classes"]) == info["classes"] == ["cat", "dog", "fish"]
    assert meta["headstart_version"] == info["headstart_version"] == __version__
    assert [i.name for i in graph.graph.input] == [v["name"] for v in info["inputs"]] == ["pixels"]
    assert info["normalization"]["in_graph"] and info["quantization"] == "float32"
    assert [o.name for o in graph.graph.output] == ["probabilities"]
    assert not list(model.glob("*.tmp*")) and not list(model.glob(".*"))  # the atomic write left nothing beside it


@pytest.mark.parametrize("which", ["exported", "exported_native"])
def test_export_agrees_with_pytorch(which, request) -> None:
    from headstart.serve.onnx_predictor import load_export

    model, photos, _ = request.getfixturevalue(which)
    paths = sorted(photos.rglob("*.jpg"))
    predictor = load_export(model)
    assert predictor is not None
    assert len(predictor.info.views) == (2 if which == "exported_native" else 1)
    got = predictor.predict_proba(paths)
    ref = _torch_reference(model, paths)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-3
    assert (got.argmax(1) == ref.argmax(1)).all()
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_plain_onnxruntime_recipe_gives_the_same_answer(exported) -> None:
    from headstart.serve.onnx_predictor import OnnxPredictor

    model, photos, _ = exported
    photo = sorted(photos.rglob("*.jpg"))[0]
    out = subprocess.run([sys.executable, "-c", PLAIN_RECIPE, str(model / "model.onnx"), str(photo)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    label, prob = out.stdout.split()
    row = OnnxPredictor(model / "model.onnx").predict_table([photo])[0]
    assert label == row.label and abs(float(prob) - row.confidence) < 0.02  # draft JPEG decoding aside, the same


def test_predicting_from_the_export_never_imports_torch(exported, tmp_path: Path) -> None:
    model, photos, _ = exported
    code = ("import sys; from headstart.serve.onnx_predictor import load_export; "
            "rows = load_export(sys.argv[1]).predict_table([sys.argv[2]]); "
            "print(len(rows), sum(r.error is None for r in rows), 'torch' in sys.modules, 'timm' in sys.modules)")
    env = {**os.environ, "HEADSTART_CACHE": str(tmp_path / "empty-cache")}
    out = subprocess.run([sys.executable, "-c", code, str(model), str(photos)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["24", "24", "False", "False"]
    assert not (tmp_path / "empty-cache").exists()  # nothing exported or cached on this path


def test_rows_line_up_with_inputs(exported, tmp_path: Path) -> None:
    from headstart.serve.onnx_predictor import load_export

    model, photos, _ = exported
    good = sorted(photos.rglob("*.jpg"))[:3]
    (tmp_path / "text.jpg").write_text("not an image")
    inputs = [good[0], tmp_path / "text.jpg", good[1], tmp_path / "missing.jpg", good[2]]
    rows = load_export(model).predict_table(inputs, top_k=2)
    assert [r.path for r in rows] == inputs  # one row per input, in input order (issue 12, defect 2)
    assert [r.error is None for r in rows] == [True, False, True, False, True]
    assert all(len(r.top_k) == 2 and r.label == r.top_k[0][0] for r in rows if r.error is None)


def test_export_that_disagrees_fails_and_leaves_no_file(exported, tmp_path: Path, monkeypatch) -> None:
    import onnx
    from onnx import numpy_helper

    from headstart.errors import ArtifactError
    from headstart.serve import export

    model, photos, cache = exported
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    (copy / "model.onnx").unlink()
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))

    def wrong_graph(_model, _views, path: Path) -> None:
        # The good graph with one class's bias raised: a graph that computes something else than the saved model.
        graph = onnx.load(str(model / "model.onnx"))
        bias = next(t for t in graph.graph.initializer if list(t.dims) == [3])
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32([2, 0, 0]), bias.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(export, "_export_graph", wrong_graph)
    with pytest.raises(ArtifactError, match="disagrees with PyTorch"):
        export.export_model(copy, photos)
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in model.iterdir() if p.name != "model.onnx")
    monkeypatch.undo()
    kept = (model / "model.onnx").read_bytes()  # an export already there stays as it was
    shutil.copy2(model / "model.onnx", copy / "model.onnx")
    monkeypatch.setattr(export, "_export_graph", wrong_graph)
    with pytest.raises(ArtifactError):
        export.export_model(copy, photos)
    assert (copy / "model.onnx").read_bytes() == kept


def test_stale_export_is_ignored(exported, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from headstart.serve.onnx_predictor import load_export

    model, _, _ = exported
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    key = next(k for k in tensors if k.startswith("head.layers"))
    tensors[key] = tensors[key] + 1.0  # "trained again": other weights under the same folder
    save_file(tensors, str(copy / "model.safetensors"))
    assert load_export(copy) is None
    assert load_export(model) is not None


@pytest.mark.parametrize("max_drop, accepted", [(100.0, True), (-1.0, False)])
def test_int8_is_kept_only_within_the_tolerance(exported, tmp_path: Path, monkeypatch, max_drop, accepted) -> None:
    import onnx

    from headstart.serve.export_quantize import quantize_int8
    from headstart.serve.onnx_predictor import load_export

    model, photos, cache = exported
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    before = (copy / "model.onnx").read_bytes()
    report = quantize_int8(copy, photos, max_drop=max_drop)
    assert report.accepted is accepted and report.n_calibration > 0 and report.n_val > 0
    assert 0.0 <= report.float_accuracy <= 1.0 and 0.0 <= report.int8_accuracy <= 1.0
    predictor = load_export(copy)
    if accepted:
        ops = {n.op_type for n in onnx.load(str(copy / "model.onnx")).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and predictor.info.quantization.startswith("int8")
        assert report.int8_bytes == (copy / "model.onnx").stat().st_size
    else:
        assert (copy / "model.onnx").read_bytes() == before and predictor.info.quantization == "float32"
        assert "points" in report.reason
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in model.iterdir())
    assert predictor.predict_proba(sorted(photos.rglob("*.jpg"))[:4]).shape == (4, 3)


def test_cli_export_prints_the_check(exported, tmp_path: Path) -> None:
    model, photos, cache = exported
    printed = (model.parent / "export.out").read_text()  # the fixture exported through `headstart export`
    assert f"wrote {model / 'model.onnx'}" in printed and "MiB, float32" in printed
    assert "parity with PyTorch on 12 generated images" in printed and "top-1 agreement 100.0%" in printed
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    (copy / "model.onnx").unlink()
    refused = run_headstart("export", copy, "--quantize", "int8", env=cli_env(cache), columns=None, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error: --quantize int8")
    assert "\n" not in refused.stderr.strip() and not (copy / "model.onnx").exists()


def test_generated_parity_images_are_seeded(exported) -> None:
    from headstart.serve import artifact
    from headstart.serve.export import parity_images

    model, _, _ = exported
    rec = artifact.load(model).record
    a, source = parity_images(rec, None)
    b, _ = parity_images(rec, None)
    assert source == "generated images" and len(a) >= 8
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert len({im.size for im in a}) > 3  # several sizes and aspect ratios


def test_the_graph_applies_the_stored_temperature(exported, tmp_path: Path, monkeypatch) -> None:
    """A model whose head stores T = 3 exports a graph whose probabilities are softmax(logits / 3): the export's
    own parity check (against head_proba, which divides by T) passes, and the scores soften, labels unchanged."""
    from headstart.serve.export import export_model
    from headstart.serve.onnx_predictor import OnnxPredictor
    from headstart.evaluate.calibration import scaled_proba

    model, photos, cache = exported
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    warm = tmp_path / "warm"
    shutil.copytree(model, warm)
    meta = json.loads((warm / "headstart.json").read_text())
    meta["head"]["temperature"] = 3.0
    (warm / "headstart.json").write_text(json.dumps(meta))
    report = export_model(warm, photos)
    assert report.parity.max_dprob < 1e-3
    paths = sorted(photos.rglob("*.jpg"))[:8]
    plain = OnnxPredictor(model / "model.onnx").predict_proba(paths)
    softened = OnnxPredictor(warm / "model.onnx").predict_proba(paths)
    np.testing.assert_allclose(softened, scaled_proba(np.log(plain), 3.0), atol=1e-4)
    assert (softened.argmax(1) == plain.argmax(1)).all() and softened.max(1).mean() < plain.max(1).mean()
