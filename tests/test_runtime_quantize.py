"""The int8 engine (runtime.quantize) and the `engine` setting, on the tiny backbone: calibration on a fixed
reference set once per backbone, whatever the cache saw before, features close to float32's and cached apart from them, `auto`'s choice and its
float32 fallback, a saved model predicting with the engine it was trained with, and the CLI end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from helpers_cli import run_headstart
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from headstart.backbones.registry import resolve
from headstart.runtime import device, frozen as frozen_mod, quantize
from headstart.runtime.engines import ONNX_CPU, OnnxEngine, ViewsEngine, any_size_path
from headstart.runtime.export import onnx_path_for
from headstart.runtime.frozen import FrozenBackbone, resolve_engine


def _photos(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(folder.rglob("*.jpg")))


def _backbone(tiny_weights: Path, engine: str = "int8") -> FrozenBackbone:
    return FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights).with_engine(engine)


def _features(backbone: FrozenBackbone, photos: tuple[Path, ...]) -> np.ndarray:
    from headstart.cache.pipeline import extract

    engine = backbone.engine("cpu")
    return np.concatenate([f for _, f, _ in extract(list(photos), backbone.spec.preprocess, engine)])


def test_int8_engine_is_calibrated_once_and_close_to_fp32(tiny_cache, tiny_weights, image_folder) -> None:
    photos = _photos(image_folder)
    int8 = _backbone(tiny_weights, "int8")
    assert int8.engine_kind("cpu") == quantize.INT8_PREFIX  # ranges still to be measured: no cache holds this kind
    engine = int8.engine("cpu")
    assert engine.kind.startswith(quantize.INT8_PREFIX + "-") and engine.kind == int8.engine_kind("cpu")
    calibration = quantize.calibration_path(onnx_path_for(int8.spec, int8.weights_id))
    stamp = calibration.stat().st_mtime_ns
    # A later run, on other photos or none, reuses the backbone's ranges: same kind, no second calibration.
    again = _backbone(tiny_weights, "int8").engine("cpu")
    assert again.kind == engine.kind and calibration.stat().st_mtime_ns == stamp
    got, ref = _features(int8, photos), _features(_backbone(tiny_weights, "fp32"), photos)
    assert got.shape == ref.shape and not np.array_equal(got, ref)  # really another arithmetic
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.9, cos.min()


def test_int8_features_are_cached_apart_from_fp32(tiny_cache, tiny_weights, image_folder) -> None:
    from headstart.cache.features import FeatureCache

    photos = list(_photos(image_folder))
    int8, fp32 = _backbone(tiny_weights, "int8"), _backbone(tiny_weights, "fp32")
    cache8 = FeatureCache(int8, engine_kind=int8.engine_kind("cpu"))
    first = cache8.features_for(photos, lambda: int8.engine("cpu"))
    assert first.hits == 0 and cache8.engine_kind.startswith(quantize.INT8_PREFIX + "-")  # re-keyed once named
    assert FeatureCache(int8, engine_kind=int8.engine_kind("cpu")).features_for(
        photos, lambda: int8.engine("cpu")).hits == len(photos)
    cache32 = FeatureCache(fp32, engine_kind=fp32.engine_kind("cpu"))
    assert cache32.dir != cache8.dir and cache32.engine_kind == ONNX_CPU
    assert cache32.features_for(photos, lambda: fp32.engine("cpu")).hits == 0
    assert int8.cache_key(cache8.engine_kind) != fp32.cache_key(ONNX_CPU)
    assert "engine" not in fp32.feature_key_parts(ONNX_CPU)  # float32 caches already on disk stay valid


def test_auto_is_int8_only_where_the_cpu_runs_it_clearly_faster(monkeypatch, tmp_path) -> None:
    def name(setting: str) -> str:
        return resolve_engine(backbone, "cpu", setting).name

    backbone = FrozenBackbone(resolve(TINY_BACKBONE), tmp_path / "weights.safetensors", "0" * 16)
    monkeypatch.setattr(frozen_mod, "int8_is_fast", lambda: True)
    assert (name("auto"), name("fp32"), name("int8")) == ("int8", "fp32", "int8")
    monkeypatch.setattr(frozen_mod, "int8_is_fast", lambda: False)
    assert (name("auto"), name("int8")) == ("fp32", "int8")  # asked for by name: honoured
    for flags, fast in (("fpu sse2 avx avx2 fma", False), ("fpu avx2 avx512f avx512_vnni avx512_bf16", True),
                        ("fpu avx2 avx_vnni", True), ("fp asimd asimddp", False), ("fp asimd", False)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n" if "fpu" in flags else f"Features\t: {flags}\n")
        assert device.int8_is_fast(info) is fast, flags
    assert device.int8_is_fast(tmp_path / "missing") is False  # an unknown CPU: float32


def test_a_broken_quantizer_falls_back_to_fp32(tiny_cache, tiny_weights, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(quantize, "quantize", broken)
    assert _backbone(tiny_weights, "int8").engine("cpu").kind == ONNX_CPU


def test_the_calibration_does_not_depend_on_what_the_cache_saw_first(tiny_onnx, tiny_weights, tmp_path,
                                                                      monkeypatch) -> None:
    """Issue 26: the ranges were measured on the photos of the first int8 run in a cache, so the same command gave
    another model in another cache. Now two caches whose first int8 runs had different photos (or none: a saved
    model predicting) hold the same ranges, the same int8 graph and give the same features to the bit."""
    from helpers_models import seed_tiny_export

    a = make_image_folder(tmp_path / "a", ("x", "y"), per_class=10, size=(64, 48), seed=1)
    b = make_image_folder(tmp_path / "b", ("u",), per_class=12, size=(40, 80), seed=2)
    kinds, feats = [], []
    for name, first in (("one", _photos(a)), ("two", _photos(b)), ("three", ())):  # what each cache's first run saw
        monkeypatch.setenv("HEADSTART_CACHE", str(seed_tiny_export(tiny_onnx, tmp_path / f"cache-{name}")))
        backbone = _backbone(tiny_weights, "int8")
        if first:
            _features(backbone, first)
        kinds.append(backbone.engine("cpu").kind)
        feats.append(_features(backbone, _photos(a)[:6]))
    assert kinds[0].startswith(quantize.INT8_PREFIX + "-") and len(set(kinds)) == 1
    assert np.array_equal(feats[0], feats[1]) and np.array_equal(feats[0], feats[2])
    assert len(quantize.reference_photos()) == quantize.CALIBRATION_IMAGES
    # a cache calibrated on a run's photos before the fixed set is calibrated again rather than trusted
    assert quantize.REFERENCE_SET in quantize.calibration_path(Path("/c/onnx/lite0.onnx")).name


def test_a_damaged_int8_graph_is_quantized_again(tiny_cache, tiny_weights, image_folder) -> None:
    backbone = _backbone(tiny_weights, "int8")
    kind = backbone.engine("cpu").kind
    fp32 = onnx_path_for(backbone.spec, backbone.weights_id)
    graph = quantize.quantized_path(fp32, quantize.calibration_path(fp32))
    graph.write_bytes(b"not a graph")
    engine = backbone.engine("cpu")
    assert isinstance(engine, OnnxEngine) and engine.kind == kind and graph.stat().st_size > 1000


def test_ranges_without_their_means_are_calibrated_again(tiny_cache, tiny_weights, image_folder) -> None:
    # A cache from before the bias correction holds the ranges alone: the next int8 run measures both again,
    # under a kind no earlier feature shares.
    backbone = _backbone(tiny_weights, "int8")
    kind = backbone.engine("cpu").kind
    fp32 = onnx_path_for(backbone.spec, backbone.weights_id)
    calibration = quantize.calibration_path(fp32)
    quantize.means_path(calibration).unlink()
    assert backbone.engine_kind("cpu") == quantize.INT8_PREFIX
    again = _backbone(tiny_weights, "int8").engine("cpu")
    assert again.kind.startswith(quantize.INT8_PREFIX + "-") and quantize.means_path(calibration).exists()
    assert again.kind == kind  # the same photos measure the same calibration


def test_native_view_runs_both_int8_graphs(tiny_cache, tiny_weights, image_folder) -> None:
    from dataclasses import replace

    spec = resolve(TINY_BACKBONE)
    spec = replace(spec, any_input_size=True, preprocess=replace(spec.preprocess, native_size=96))
    backbone = FrozenBackbone.pretrained(spec, tiny_weights).with_engine("int8")
    engine = backbone.engine("cpu")
    assert isinstance(engine, ViewsEngine) and engine.kind.startswith(quantize.INT8_PREFIX + "-")
    assert engine.any_size.kind == engine.fixed.kind == engine.kind
    feats = _features(backbone, _photos(image_folder)[:4])
    assert feats.shape[0] == 4 and np.isfinite(feats).all()


def test_a_standard_size_int8_run_quantizes_the_any_size_twin_too(tiny_cache, tiny_weights, image_folder) -> None:
    """Both int8 graphs are made once, by the first int8 run, as the float export makes both: a later run on small
    photos (a native view) then opens them without quantizing anything."""
    from dataclasses import replace

    spec = replace(resolve(TINY_BACKBONE), any_input_size=True)
    standard = FrozenBackbone.pretrained(spec, tiny_weights).with_engine("int8")
    assert not isinstance(standard.engine("cpu"), ViewsEngine)
    fp32 = onnx_path_for(standard.spec, standard.weights_id)
    calibration = quantize.calibration_path(fp32)
    twin = quantize.quantized_path(any_size_path(fp32), calibration)
    assert twin.exists()
    made = twin.stat().st_mtime_ns
    native = replace(spec, preprocess=replace(spec.preprocess, native_size=96))
    engine = FrozenBackbone.pretrained(native, tiny_weights).with_engine("int8").engine("cpu")
    assert isinstance(engine, ViewsEngine) and twin.stat().st_mtime_ns == made


def test_a_saved_model_predicts_with_the_engine_it_was_trained_with(tiny_cache, tiny_weights, image_folder,
                                                                     tmp_path, monkeypatch) -> None:
    from headstart import ImageClassifier

    monkeypatch.setattr(frozen_mod, "int8_is_fast", lambda: True)
    photos = list(_photos(image_folder))
    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=3, device="cpu").fit(image_folder)
    kind = clf.frozen_.engine_kind("cpu")
    assert clf.engine == "auto" and kind.startswith(quantize.INT8_PREFIX + "-")
    saved = clf.save(tmp_path / "model")
    assert json.loads((saved / "headstart.json").read_text())["params"]["engine"] == "int8"  # what ran, not auto
    loaded = ImageClassifier.load(saved, device="cpu")
    assert loaded.frozen_.engine_kind("cpu") == kind
    np.testing.assert_allclose(loaded.predict_proba(photos), clf.predict_proba(photos), atol=1e-6)
    fp32 = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=3, device="cpu", engine="fp32")
    assert fp32.fit(image_folder).frozen_.engine_kind("cpu") == ONNX_CPU
    assert fp32.cached_ == 0  # int8's cached features were not taken for float32 ones
    again = ImageClassifier.load(fp32.save(tmp_path / "fp32"), device="cpu")
    assert again.frozen_.engine_kind("cpu") == ONNX_CPU


def test_a_model_saved_before_engines_were_a_setting_predicts_in_fp32(tiny_cache, tiny_weights, image_folder,
                                                                     tmp_path) -> None:
    from headstart import ImageClassifier

    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=2, device="cpu", engine="fp32").fit(image_folder)
    out = clf.save(tmp_path / "old")
    meta = json.loads((out / "headstart.json").read_text())
    del meta["params"]["engine"]
    (out / "headstart.json").write_text(json.dumps(meta))
    assert ImageClassifier.load(out, device="cpu").frozen_.engine_name == "fp32"


def test_cli_engine_flag_end_to_end(tiny_cache, tiny_weights, tmp_path) -> None:
    photos = make_image_folder(tmp_path / "photos", per_class=6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = run_headstart("train", photos, "--engine", "int4", "--out", tmp_path / "bad", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "int4" in bad.stderr
    common = ("--backbone", TINY_BACKBONE, "--weights", tiny_weights, "--epochs", "2", "--device", "cpu")
    got = run_headstart("train", photos, *common, "--engine", "int8", "--out", tmp_path / "m", env=env)
    assert got.returncode == 0, got.stdout + got.stderr
    assert json.loads((tmp_path / "m" / "headstart.json").read_text())["params"]["engine"] == "int8"
    fp32 = onnx_path_for(resolve(TINY_BACKBONE), FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights)
                         .weights_id)
    assert quantize.calibration_path(fp32).exists()
    pred = run_headstart("predict", tmp_path / "m", photos, "--format", "csv", env=env)
    assert pred.returncode == 0, pred.stderr
    assert len(pred.stdout.strip().splitlines()) == 1 + len(_photos(photos))
    ev = run_headstart("evaluate", tmp_path / "m", photos, env=env)
    assert ev.returncode == 0, ev.stderr
