"""A full disk: writes into the cache (HEADSTART_CACHE) or a model's --out on a filesystem with no room give
one clear line (a UserError: "no space left on the device holding FOLDER ...: free some space there or ...")
and a non-zero exit, and leave what was there before intact: a previous model directory, the feature shards
already cached, no temporary file behind. Memory-mapped boundary stores are allocated up front, so a full disk
is that one line, not a SIGBUS halfway through the fill.

The small filesystem is a 4 MiB tmpfs mounted for the test (CI runs as root). Where mounting is impossible,
the command-line tests still run, in children whose RLIMIT_FSIZE makes every write past a few KiB fail (EFBIG,
with SIGXFSZ ignored); the in-process tests, which need a real full filesystem, are skipped then.
HEADSTART_TEST_FULL_DISK=rlimit forces that fallback.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers_cli import assert_one_line, cli_env
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE, seed_tiny_export

from headstart.errors import UserError
from headstart.paths import atomic_write_bytes

TIMEOUT_S = 180


class SmallDisk:
    """A folder on a filesystem that can be filled: a tmpfs of `size`, or (mode "rlimit") an ordinary folder
    whose children may not write files past `limit` bytes."""

    def __init__(self, root: Path, mode: str) -> None:
        self.root, self.mode = root, mode
        self.filler = root / "filler"

    def fill(self) -> None:
        """Take every free byte (a tmpfs); with a file-size limit there is nothing to take."""
        if self.mode != "tmpfs":
            return
        chunk = b"\0" * (64 << 10)
        with open(self.filler, "ab", buffering=0) as f:  # unbuffered: closing has nothing left to write
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        assert shutil.disk_usage(self.root).free < (64 << 10)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def run(self, args: list[str], env: dict[str, str], limit: int) -> subprocess.CompletedProcess[str]:
        """`args` in a child process; under "rlimit", no file may grow past `limit` bytes in it."""
        def limited() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S,
                              env={**env, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
                              preexec_fn=limited if self.mode == "rlimit" else None)


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.environ.get("HEADSTART_TEST_FULL_DISK") == "rlimit" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    root = tmp_path / "small"
    root.mkdir()
    mounted = _mount_tmpfs(root, "4m")
    try:
        yield SmallDisk(root, "tmpfs" if mounted else "rlimit")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)


@pytest.fixture
def full_tmpfs(small_disk: SmallDisk) -> SmallDisk:
    if small_disk.mode != "tmpfs":
        pytest.skip("no small filesystem could be mounted here (the command-line tests run with RLIMIT_FSIZE)")
    return small_disk


def _litter(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- in process, on a real full filesystem -------------------------------------------------------------------


def test_a_write_on_a_full_disk_is_one_line_and_the_old_file_stays(full_tmpfs, tmp_path, monkeypatch):
    target = full_tmpfs.root / "model" / "headstart.json"
    atomic_write_bytes(target, b"the previous model")
    full_tmpfs.fill()
    with pytest.raises(UserError) as err:
        atomic_write_bytes(target, b"x" * (1 << 20))
    assert_one_line(str(err.value), "no space left", str(target.parent), "choose a folder")
    assert target.read_bytes() == b"the previous model" and _litter(full_tmpfs.root) == []

    monkeypatch.setenv("HEADSTART_CACHE", str(full_tmpfs.root))  # inside the cache, the way out is another one
    with pytest.raises(UserError) as err:
        atomic_write_bytes(full_tmpfs.root / "features" / "x.npy", b"x" * (1 << 20))
    assert_one_line(str(err.value), "no space left", "HEADSTART_CACHE")


def test_a_feature_cache_on_a_full_disk_keeps_its_shards_and_says_so(full_tmpfs, tiny_onnx, tiny_weights, photos,
                                                                     monkeypatch):
    from headstart.backbones.registry import resolve
    from headstart.cache.features import FeatureCache
    from headstart.runtime.frozen import FrozenBackbone

    monkeypatch.setenv("HEADSTART_CACHE", str(full_tmpfs.root))
    seed_tiny_export(tiny_onnx, full_tmpfs.root)
    frozen = FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights)
    first = FeatureCache(frozen).features_for(photos[:6], lambda: frozen.engine("cpu")).features
    before = _snapshot(full_tmpfs.root / "features")
    full_tmpfs.fill()

    with pytest.raises(UserError) as err:
        FeatureCache(frozen).features_for(photos, lambda: frozen.engine("cpu"))
    assert_one_line(str(err.value), "no space left", "HEADSTART_CACHE")
    assert _snapshot(full_tmpfs.root / "features") == before and _litter(full_tmpfs.root) == []

    full_tmpfs.free()
    got = FeatureCache(frozen).features_for(photos, lambda: frozen.engine("cpu"))
    assert got.hits == 6
    np.testing.assert_array_equal(got.features[:6], first)


def test_an_export_failing_on_a_full_disk_is_that_line_not_a_remembered_export_failure(full_tmpfs, tiny_weights,
                                                                                        monkeypatch):
    """The exporter says it in words of its own; taken for a network it cannot export, the run would fall back to
    torch and remember never to export again."""
    from headstart.backbones.registry import resolve
    from headstart.runtime.export import known_failure, onnx_path_for
    from headstart.runtime.frozen import FrozenBackbone

    monkeypatch.setenv("HEADSTART_CACHE", str(full_tmpfs.root))

    def exporter_out_of_room(*args, **kwargs):
        raise RuntimeError("Failed to export the model: could not write the serialized program")

    monkeypatch.setattr("headstart.runtime.frozen.export_onnx", exporter_out_of_room)
    frozen = FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights)
    (full_tmpfs.root / "onnx").mkdir()
    full_tmpfs.fill()
    with pytest.raises(UserError) as err:
        frozen.engine("cpu")
    assert_one_line(str(err.value), "no space left", "HEADSTART_CACHE")
    full_tmpfs.free()
    assert known_failure(onnx_path_for(frozen.spec, frozen.weights_id)) is None


_FILL_STORE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from headstart.cache.boundary import BoundaryStore, PixelViews
    from headstart.errors import UserError
    from headstart.vision.preprocess import PreprocessConfig
    root, *paths = sys.argv[1:]
    try:
        BoundaryStore({"test": "full"}, Path(root)).fill("train", [Path(p) for p in paths], 4, "light", 0,
                                                          PreprocessConfig(), PixelViews(), batch_images=8)
    except UserError as exc:
        print("USER ERROR:", exc)
        sys.exit(2)
    print("filled")
""")


def test_a_boundary_store_on_a_full_disk_is_one_line_not_a_sigbus(full_tmpfs, tmp_path):
    """The store's arrays are memory-mapped: a sparse file on a full disk is a SIGBUS at the first page written.
    A real child process, since a SIGBUS would take the test runner with it."""
    paths = sorted(make_image_folder(tmp_path / "photos", per_class=6).rglob("*.jpg"))
    full_tmpfs.fill()
    full_tmpfs.filler.write_bytes(full_tmpfs.filler.read_bytes()[: -(256 << 10)])  # room for the header, not 18 x 4 views
    proc = full_tmpfs.run([sys.executable, "-c", _FILL_STORE, str(full_tmpfs.root), *map(str, paths)], dict(os.environ),
                          limit=0)
    assert proc.returncode == 2, f"rc {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("USER ERROR:")]
    assert_one_line(line, "no space left", "train.acts.npy")


# --- the command line, on a small filesystem or under a file-size limit -------------------------------------------


def _train(disk: SmallDisk, data: Path, out: Path, cache: Path, weights: Path, limit: int):
    return disk.run([sys.executable, "-m", "headstart", "train", str(data), "--backbone", TINY_BACKBONE,
                     "--weights", str(weights), "--epochs", "3", "--device", "cpu", "--strategy", "head",
                     "--out", str(out)], cli_env(cache), limit)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def _seed_cache(cache: Path, tiny_onnx: tuple[Path, Path]) -> None:
    seed_tiny_export(tiny_onnx, cache)


def test_train_with_its_cache_on_a_full_disk_says_so_in_one_line(small_disk, tiny_onnx, tiny_weights, tmp_path):
    from headstart.backbones.registry import resolve
    from headstart.cache.features import FeatureCache
    from headstart.runtime.frozen import FrozenBackbone

    data = make_image_folder(tmp_path / "photos", per_class=6)
    cache = small_disk.root / "cache"
    _seed_cache(cache, tiny_onnx)
    os.environ["HEADSTART_CACHE"], saved = str(cache), os.environ.get("HEADSTART_CACHE")
    try:  # an earlier run cached six of the photos
        frozen = FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights)
        FeatureCache(frozen).features_for(sorted(data.rglob("*.jpg"))[:6], lambda: frozen.engine("cpu"))
    finally:
        os.environ["HEADSTART_CACHE"] = saved or ""
    before = _snapshot(cache)
    small_disk.fill()

    proc = _train(small_disk, data, tmp_path / "model", cache, tiny_weights, limit=16 << 10)
    line = _one_error_line(proc)
    assert_one_line(line, "space left" if small_disk.mode == "tmpfs" else "file size limit", "HEADSTART_CACHE")
    assert _snapshot(cache) == before and _litter(cache) == []
    assert not (tmp_path / "model").exists()


def test_train_with_out_on_a_full_disk_keeps_the_previous_model(small_disk, tiny_onnx, tiny_weights, tmp_path):
    data = make_image_folder(tmp_path / "photos", per_class=6)
    cache = tmp_path / "cache"
    _seed_cache(cache, tiny_onnx)
    out = small_disk.root / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous model's weights")
    (out / "headstart.json").write_text('{"the previous model": true}')
    before = _snapshot(out)
    small_disk.fill()

    proc = _train(small_disk, data, out, cache, tiny_weights, limit=64 << 10)
    line = _one_error_line(proc)
    assert_one_line(line, "space left" if small_disk.mode == "tmpfs" else "file size limit", str(out))
    assert "HEADSTART_CACHE" not in line  # the cache is not where the room is missing
    after = _snapshot(out)
    assert {name: after.get(name) for name in before} == before and _litter(out) == []
