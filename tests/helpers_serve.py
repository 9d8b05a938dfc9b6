"""A tiny trained and exported model shared by the serve tests (export, app, browser): built once per test run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers_cli import cli_env, run_headstart
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE, seed_tiny_export


def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path, tiny_onnx: tuple[Path, Path],
               native: bool = False) -> tuple[Path, Path, Path]:
    """(model directory with model.onnx, the photos it was trained on, the cache it used), trained on the tiny
    backbone and exported once per run whichever serve test file asks first. With `native`, the backbone is
    declared any-size and the photos small, so the model gets a native view (a second graph input)."""
    name = "serve-tiny-native" if native else "serve-tiny"
    base = tmp_path_factory.getbasetemp() / name
    model, photos, cache = base / "model", base / "photos", base / "cache"
    if (model / "model.onnx").is_file():
        return model, photos, cache
    shutil.rmtree(base, ignore_errors=True)
    seed_tiny_export(tiny_onnx, cache)
    make_image_folder(photos, per_class=8, size=(40, 32) if native else (96, 80), seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSTART_CACHE", str(cache))
        from headstart import ImageClassifier
        from headstart.serve.export import export_model  # noqa: F401  torch-using: imported when it runs

        if native:
            import dataclasses

            from headstart.train import pipeline

            real = pipeline.resolve
            mp.setattr(pipeline, "resolve", lambda n: dataclasses.replace(real(n), any_input_size=True))
        clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=8, device="cpu")
        clf.fit(photos).save(model)
        if native:
            export_model(model, photos)
    if not native:  # through the real command line, whose output test_serve_export reads
        out = run_headstart("export", model, env=cli_env(cache), columns=None, timeout=300)
        assert out.returncode == 0, out.stderr
        (base / "export.out").write_text(out.stdout)
    return model, photos, cache
