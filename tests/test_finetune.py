"""Stage 2 (fine-tuning) on the tiny random-weight backbone: which weights train, the boundary cache, augmentation,
checkpoints and resuming (in-process and after a real SIGKILL), the auto strategy, saving, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_BACKBONE, assert_one_line, make_image, make_image_folder

torch = pytest.importorskip("torch")

from headstart import ImageClassifier
from headstart.train import checkpoint
from headstart.train import finetune as ft
from headstart.train import stage2 as strategy  # noqa: E402
from headstart.vision.augment import augmented_view  # noqa: E402
from headstart.backbones.weights import read_state_dict
from headstart.backbones.registry import resolve  # noqa: E402
from headstart.cache.boundary import BoundaryStore, bottom_engine, stores_pixels  # noqa: E402
from headstart.errors import UserError  # noqa: E402
from headstart.runtime.frozen import FrozenBackbone  # noqa: E402
from headstart.heads.config import HeadConfig  # noqa: E402
from headstart.heads.module import Head
from headstart.backbones.pooled import PooledFeatures  # noqa: E402
from headstart.vision.preprocess import PreprocessConfig, eval_transform  # noqa: E402

N_STAGES = 5  # test_efficientnet: blocks.0 .. blocks.4
PRE = resolve(TINY_BACKBONE).preprocess  # 160 px
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


# --- helpers and fixtures -------------------------------------------------------------------------------------

def _frozen(weights: Path) -> FrozenBackbone:
    return FrozenBackbone.pretrained(resolve(TINY_BACKBONE), weights)


def _net(weights: Path) -> PooledFeatures:
    return _frozen(weights).build_torch()


def _stage_of(key: str) -> int | None:
    """Stage index of a backbone state key: -1 for the stem, 0.. for blocks, N_STAGES for conv_head/bn2."""
    key = key.removeprefix("backbone.")
    if key.startswith(("conv_stem.", "bn1.")):
        return -1
    if key.startswith("blocks."):
        return int(key.split(".")[1])
    if key.startswith(("conv_head.", "bn2.")):
        return N_STAGES
    return None


def _is_bn_stat(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in BN_STATS


def _is_conv_weight(key: str) -> bool:
    return key.endswith(".weight") and key.rsplit(".", 2)[-2].startswith("conv")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch's OpenMP threads spin-wait on each other: on a busy 2-core machine the tiny model's steps take ~300x
    longer with 2 threads than with 1. One thread keeps these tests fast whatever else runs beside them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bottom(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny backbone's frozen bottom below stage 3 (what --unfreeze 2 caches), exported once per run."""
    root = tmp_path_factory.mktemp("tiny-bottom-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSTART_CACHE", str(root))
        frozen = _frozen(tiny_weights)
        bottom_engine(frozen.build_torch(), N_STAGES - 2, frozen.weights_id, PRE)
    (path,) = (root / "onnx").glob("bottom-*.onnx")
    return root, path.relative_to(root)


@pytest.fixture
def ft_cache(tiny_cache: Path, tiny_bottom: tuple[Path, Path]) -> Path:
    """This test's cache with the tiny backbone's full and bottom (boundary 3) ONNX exports already in it."""
    root, rel = tiny_bottom
    (tiny_cache / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / rel, tiny_cache / rel)
    return tiny_cache


@pytest.fixture
def make_clf(tiny_weights, ft_cache):
    def make(**kwargs) -> ImageClassifier:
        params = dict(epochs=5, device="cpu", strategy="finetune", unfreeze=2, finetune_epochs=2, views=1)
        return ImageClassifier(TINY_BACKBONE, weights=tiny_weights, **{**params, **kwargs})

    return make


def _synthetic_split(net: PooledFeatures, boundary: int, n: int, seed: int, size: int = 64) -> dict:
    """Boundary activations of small random images whose class is a colour shift, as `finetune` takes them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    x[torch.arange(n), labels] += 1.5
    if stores_pixels(boundary):  # every stage trains: the store holds the pixels and the stem runs per batch
        h, taps = x, x.new_zeros(n, 0)
    else:
        with torch.no_grad():
            h, taps = net.eval().forward_bottom(x, boundary)
    return dict(acts=h[:, None].numpy().astype(np.float16), taps=taps[:, None].numpy(), labels=labels.numpy())


def _head_for(net: PooledFeatures) -> Head:
    torch.manual_seed(1)
    with torch.no_grad():
        dim = net.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    return Head(HeadConfig(dim, 3))


def _always_improving(monkeypatch) -> None:
    """Each validation reports a lower loss than the last (accuracy stays real), so every epoch is the best one and
    the weights kept are the last epoch's: tests of what trains then do not hang on how well it trains."""
    real, calls = ft._validate, [0]

    def validate(*args, **kwargs):
        _, acc = real(*args, **kwargs)
        calls[0] += 1
        return 1.0 / calls[0], acc

    monkeypatch.setattr(ft, "_validate", validate)


def _state(net: PooledFeatures) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


# --- 1. BatchNorm and frozen stages ---------------------------------------------------------------------------

@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_stages_never_change_and_bn_statistics_follow_train_bn(tiny_weights, train_bn, monkeypatch):
    _always_improving(monkeypatch)
    net = _net(tiny_weights)
    boundary = ft.boundary_for(net, 2)
    assert boundary == N_STAGES - 2
    data = _synthetic_split(net, boundary, 12, seed=0)
    head = _head_for(net)
    before = _state(net)
    cfg = ft.FinetuneConfig(unfreeze=2, epochs=3, views=1, lr=1e-2, head_lr=1e-2, batch_size=4, patience=10,
                            train_bn=train_bn)
    history = ft.finetune(net, head, cfg, data, data)
    assert history.best_epoch == 2  # the kept weights are the last epoch's, not the start's
    after = net.state_dict()
    assert set(after) == set(before)

    frozen = [k for k in before if _stage_of(k) < boundary]
    assert any("conv_stem" in k for k in frozen) and any(k.endswith("running_var") for k in frozen)
    for k in frozen:
        assert torch.equal(after[k], before[k]), k

    unfrozen = [k for k in before if _stage_of(k) >= boundary]
    stats = [k for k in unfrozen if _is_bn_stat(k)]
    convs = [k for k in unfrozen if _is_conv_weight(k)]
    assert stats and convs
    for k in convs:
        assert not torch.equal(after[k], before[k]), f"{k} did not train"
    for k in stats:
        if train_bn:
            assert not torch.equal(after[k], before[k]), f"{k} kept its statistics with train_bn"
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed without train_bn"
    assert not net.training and not head.training  # left in inference mode


# --- 2. whole stages train --------------------------------------------------------------------------------------

@pytest.mark.parametrize("unfreeze", [1, 2, N_STAGES, "all"])
def test_set_trainable_unfreezes_exactly_the_top_stages_and_they_all_get_gradients(tiny_weights, unfreeze):
    net = _net(tiny_weights)
    boundary = ft.boundary_for(net, unfreeze)
    assert boundary == (0 if unfreeze == "all" else N_STAGES - unfreeze)
    units = ft.set_trainable(net, boundary)
    everything = boundary == 0  # every stage: the stem trains too
    assert len(units) == everything + N_STAGES - boundary + 1  # (the stem), the stages, then conv_head + bn2
    names = dict(net.named_parameters())
    expect = {k for k in names if _stage_of(k) >= boundary or everything}
    assert {k for k, p in names.items() if p.requires_grad} == expect
    assert any(_stage_of(k) == -1 for k in expect) == everything

    head = _head_for(net)
    ft.set_modes(net, head, units, train_bn=False)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(head(net(x)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    for k, p in names.items():
        if k in expect:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{k} got no gradient"
        else:
            assert p.grad is None, f"frozen {k} got a gradient"


def test_unfreeze_all_trains_every_layer_the_stem_too_and_keeps_batchnorm_statistics(tiny_weights, monkeypatch):
    _always_improving(monkeypatch)
    net = _net(tiny_weights)
    data = _synthetic_split(net, 0, 9, seed=0)
    before = _state(net)
    cfg = ft.FinetuneConfig(unfreeze="all", epochs=2, views=1, lr=1e-2, head_lr=1e-2, batch_size=4, patience=10)
    assert ft.finetune(net, _head_for(net), cfg, data, data).best_epoch == 1
    after = net.state_dict()
    assert "backbone.conv_stem.weight" in before
    for k in before:
        if _is_bn_stat(k):
            assert torch.equal(after[k], before[k]), k
        elif _is_conv_weight(k):
            assert not torch.equal(after[k], before[k]), f"{k} did not train"


@pytest.mark.parametrize("n_units, per_unit", [(3, 0.35 ** 0.5), (8, 0.35 ** (1 / 7)), (2, 0.35), (1, 1.0)])
def test_rates_fall_from_the_top_to_a_fixed_fraction_at_the_lowest_trained_stage(n_units, per_unit):
    cfg = ft.FinetuneConfig(lr=1e-3, lowest_rate=0.35)
    decay = ft.layer_decay(cfg, n_units)
    assert decay == pytest.approx(per_unit)  # so the lowest of n units trains at 0.35 x lr


def test_cli_parses_unfreeze():
    from headstart.cli.commands import _parse_unfreeze

    assert _parse_unfreeze("all") == "all" and _parse_unfreeze("3") == 3 and _parse_unfreeze("auto") == "auto"


@pytest.mark.parametrize("unfreeze", [0, -1, N_STAGES + 1, "banana"])
def test_out_of_range_unfreeze_is_refused(tiny_weights, unfreeze):
    net = _net(tiny_weights)
    with pytest.raises(ValueError) as err:
        ft.boundary_for(net, unfreeze)
    assert isinstance(err.value, UserError)  # the CLI prints it as one line and exits 2
    assert_one_line(str(err.value), "--unfreeze", f"1..{N_STAGES}", str(unfreeze))


def test_a_backbone_without_stages_cannot_be_fine_tuned():
    with pytest.raises(ValueError, match="--strategy head") as err:
        ft.boundary_for(PooledFeatures(torch.nn.Linear(2, 2)), 1)
    assert isinstance(err.value, UserError)


# --- 3. the boundary split is exact -----------------------------------------------------------------------------

def test_top_forward_from_the_boundary_equals_the_full_forward(tiny_weights):
    net = _net(tiny_weights).eval()
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = net(x)
        for b in range(N_STAGES + 1):
            h, taps = net.forward_bottom(x, b)
            assert (taps.shape[1] > 0) == (b > N_STAGES - 3)  # stages tapped for pooling below the boundary
            top = net.forward_top(h, taps, b)
            assert top.shape == full.shape
            assert torch.allclose(top, full, atol=1e-6, rtol=0), f"boundary {b}"


@pytest.mark.parametrize("b", [N_STAGES - 2, 1])  # the session's export (--unfreeze 2); no taps below
def test_exported_bottom_matches_torch(tiny_weights, ft_cache, b):
    frozen = _frozen(tiny_weights)
    net = frozen.build_torch()
    engine = bottom_engine(net, b, frozen.weights_id, PRE)
    x = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h, taps = net.forward_bottom(x, b)
    got_h, got_taps = engine.run_all(x.numpy())
    assert got_h.shape == tuple(h.shape) and got_taps.shape == tuple(taps.shape)
    assert (taps.shape[1] > 0) == (b > N_STAGES - 3)
    np.testing.assert_allclose(got_h, h.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_taps, taps.numpy(), atol=1e-4, rtol=0)


def test_when_every_stage_trains_the_store_holds_pixels_and_the_stem_runs_per_batch(tiny_weights, ft_cache):
    frozen = _frozen(tiny_weights)
    net = frozen.build_torch()
    x = np.random.default_rng(4).normal(size=(3, 3, 96, 96)).astype(np.float32)
    stored, taps = bottom_engine(net, 0, frozen.weights_id, PRE).run_all(x)
    assert stored is x and taps.shape == (3, 0)
    assert not list((ft_cache / "onnx").glob("bottom-*-b0-*"))  # no stem exported to ONNX Runtime
    with torch.no_grad():
        full = net(torch.from_numpy(x))
    top = ft.top_features(net, 0, stored[:, None], taps[:, None])
    assert torch.allclose(top, full, atol=1e-5, rtol=0)


# --- 4. the boundary store --------------------------------------------------------------------------------------

class CountingEngine:
    def __init__(self, engine, fail_after: int | None = None) -> None:
        self.engine, self.fail_after, self.calls = engine, fail_after, 0

    def run_all(self, batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.engine.run_all(batch)


@pytest.fixture
def store_setup(tiny_weights, ft_cache, tmp_path):
    frozen = _frozen(tiny_weights)
    engine = bottom_engine(frozen.build_torch(), N_STAGES - 2, frozen.weights_id, PRE)
    paths = _images(make_image_folder(tmp_path / "photos", per_class=4, size=(72, 56)))
    return engine, paths


def _fill(store, paths, engine, progress=None):
    return store.fill("train", paths, 2, "light", 0, PRE, engine, progress, batch_images=4)


def test_boundary_store_fills_once_and_reopens(store_setup, tmp_path):
    engine, paths = store_setup
    key = dict(test="reopen")
    counting = CountingEngine(engine)
    ticks: list[int] = []
    assert _fill(BoundaryStore(key, tmp_path / "store"), paths, counting, ticks.append) == []
    assert counting.calls == 3 and sum(ticks) == len(paths)
    acts, taps, ok = BoundaryStore(key, tmp_path / "store").arrays("train")
    assert acts.shape[:2] == (12, 2) and acts.dtype == np.float16 and taps.shape[:2] == (12, 2) and ok.all()
    assert not np.array_equal(acts[:, 0], acts[:, 1])  # two different augmented views
    acts, taps = np.array(acts), np.array(taps)

    again = CountingEngine(engine)
    reopened = BoundaryStore(key, tmp_path / "store")
    ticks.clear()
    assert _fill(reopened, paths, again, ticks.append) == []
    assert again.calls == 0 and sum(ticks) == len(paths)
    acts2, taps2, _ = reopened.arrays("train")
    assert np.array_equal(acts2, acts) and np.array_equal(taps2, taps)


def test_boundary_store_resumes_after_a_crash_mid_fill(store_setup, tmp_path):
    engine, paths = store_setup
    reference = BoundaryStore(dict(test="crash"), tmp_path / "ref")
    _fill(reference, paths, engine)
    ref_acts, ref_taps, _ = (np.array(a) for a in reference.arrays("train"))

    store = BoundaryStore(dict(test="crash"), tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fill(store, paths, CountingEngine(engine, fail_after=1))
    progress = json.loads((store.dir / "progress.json").read_text())
    done = progress["train"]["done"]
    assert 0 < done < len(paths)
    # Everything progress.json claims is on disk, identical to an uninterrupted fill.
    acts = np.load(store.dir / "train.acts.npy", mmap_mode="r")
    taps = np.load(store.dir / "train.taps.npy", mmap_mode="r")
    assert np.array_equal(acts[:done], ref_acts[:done]) and np.array_equal(taps[:done], ref_taps[:done])

    resumed = CountingEngine(engine)
    assert _fill(BoundaryStore(dict(test="crash"), tmp_path / "crashed"), paths, resumed) == []
    assert resumed.calls == -(-(len(paths) - done) // 4)  # only the missing batches
    acts, taps, ok = store.arrays("train")
    assert ok.all() and np.array_equal(acts, ref_acts) and np.array_equal(taps, ref_taps)


def test_boundary_store_crash_before_any_chunk_claims_nothing(store_setup, tmp_path):
    engine, paths = store_setup
    store = BoundaryStore(dict(test="early"), tmp_path / "store")
    with pytest.raises(RuntimeError):
        _fill(store, paths, CountingEngine(engine, fail_after=0))
    progress = store.dir / "progress.json"
    assert not progress.exists() or json.loads(progress.read_text()).get("train", {}).get("done", 0) == 0


# --- 5. augmentation ---------------------------------------------------------------------------------------------

@pytest.fixture
def photo():
    return make_image((200, 60, 60), (90, 70), np.random.default_rng(0))


@pytest.mark.parametrize("level", ["light", "strong"])
def test_augmented_view_is_deterministic_per_seed_and_varies_across_seeds(photo, level):
    cfg = PreprocessConfig(input_size=48)
    a = augmented_view(photo, cfg, level, 7)
    assert a.shape == (3, 48, 48) and a.dtype == np.float32
    assert np.array_equal(a, augmented_view(photo, cfg, level, 7))
    others = [augmented_view(photo, cfg, level, s) for s in (8, 9, 10)]
    assert all(not np.array_equal(a, o) for o in others)


def test_strong_augmentation_leaves_torch_global_rng_alone(photo):
    state = torch.get_rng_state()
    augmented_view(photo, PreprocessConfig(input_size=48), "strong", 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_no_augmentation_is_the_eval_transform(photo):
    cfg = PreprocessConfig(input_size=48)
    expected = eval_transform(photo, cfg)
    for seed in (0, 1):
        assert np.array_equal(augmented_view(photo, cfg, "none", seed), expected)


@pytest.mark.parametrize("level", ["heavy", "", "Light", None])
def test_unknown_augmentation_level_is_refused(photo, level):
    with pytest.raises(ValueError, match="augment must be one of"):
        augmented_view(photo, PreprocessConfig(input_size=48), level, 0)


# --- 6. checkpoints and resuming ---------------------------------------------------------------------------------

def _interrupt_at_validation(monkeypatch, call: int) -> list[int]:
    """Make `_validate`'s `call`-th call raise KeyboardInterrupt (call 1 is the pre-training baseline, call k+1 ends
    epoch k, before its checkpoint); returns the call counter."""
    calls = [0]
    real = ft._validate

    def validate(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "_validate", validate)
    return calls


@pytest.mark.parametrize("unfreeze", [2, "all"])  # stored activations; stored pixels with the stem training
def test_resume_after_an_interruption_matches_an_uninterrupted_run(make_clf, image_folder, tmp_path, monkeypatch,
                                                                   unfreeze):
    settings = dict(finetune_epochs=3, views=2, batch_size=8, unfreeze=unfreeze)  # several batches: RNG matters
    files = _images(image_folder)
    whole = make_clf(**settings).fit(image_folder, checkpoint_dir=tmp_path / "A")
    assert not (tmp_path / "A").exists()  # a finished run removes its checkpoint
    assert whole.decision_["kept"] == "finetune"
    expected = whole.predict_proba(files)

    ckpt = tmp_path / "B"
    with monkeypatch.context() as mp:
        _interrupt_at_validation(mp, call=3)  # dies at the end of epoch 2, after epoch 1's checkpoint
        with pytest.raises(KeyboardInterrupt):
            make_clf(**settings).fit(image_folder, checkpoint_dir=ckpt)
    names = sorted(p.name for p in ckpt.iterdir())  # no pickle: one tensor file named by its digest, and JSON
    assert len(names) == 2 and names[1] == "state.json" and names[0].startswith("state-") and names[0].endswith(".safetensors")
    _assert_safetensors_layout(ckpt / names[0])
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 0

    calls = _interrupt_at_validation(monkeypatch, call=-1)  # counts only
    resumed = make_clf(**settings).fit(image_folder, checkpoint_dir=ckpt, resume=True)
    assert calls[0] == 1 + 2  # the baseline, then epochs 2 and 3 only: epoch 1 came from the checkpoint
    assert not ckpt.exists()
    assert resumed.decision_["finetune_history"] == whole.decision_["finetune_history"]
    assert resumed.frozen_.weights_id == whole.frozen_.weights_id
    np.testing.assert_allclose(resumed.predict_proba(files), expected, atol=1e-6, rtol=0)


class EpochCounter:
    """A progress sink that knows which fine-tuning epoch runs, and can die after a given number of them."""

    def __init__(self, die_after: int | None = None) -> None:
        self.started, self.epoch, self.die_after = False, 0, die_after

    def start(self, task, total):
        self.started = True

    def advance(self, n=1):
        self.epoch += n
        if self.die_after is not None and self.epoch >= self.die_after:
            raise KeyboardInterrupt

    def finish(self):
        pass


def _scripted_validation(monkeypatch, sink: EpochCounter, losses: dict) -> None:
    """Validation losses by epoch ("base" before training), so the best epoch and early stopping are chosen."""
    real = ft._validate

    def validate(*args, **kwargs):
        _, acc = real(*args, **kwargs)
        return losses[sink.epoch if sink.started else "base"], acc

    monkeypatch.setattr(ft, "_validate", validate)


@pytest.mark.parametrize("epochs, patience, expected", [(8, None, 3), (20, None, 5), (40, None, 10), (20, 2, 2)])
def test_patience_grows_with_the_run_unless_given(epochs, patience, expected):
    assert ft.FinetuneConfig(epochs=epochs, patience=patience).stop_after == expected


def test_a_long_run_survives_a_slow_start_against_the_stage1_model(tiny_weights, monkeypatch):
    """Epochs 0-2 score below the stage-1 model, epoch 3 beats it: a 16-epoch run (patience 4) goes on to it and
    stops 4 epochs after it."""
    losses = {"base": 1.0, 0: 1.2, 1: 1.1, 2: 1.05, 3: 0.5, **{e: 0.6 for e in range(4, 16)}}
    _, history = _scripted_run(tiny_weights, monkeypatch, losses, epochs=16)
    assert history.best_epoch == 3
    assert history.stopped_early and len(history.val_loss) == 8  # stopped 4 epochs after the best


def test_patience_follows_stage2_own_progress_but_the_stage1_model_stays_the_one_to_beat(tiny_weights, monkeypatch):
    """Epochs 0-3 score below the stage-1 model but improve on each other: no epoch counts as bad, and epoch 4
    beats it. Epochs that stop improving end the run (patience 3); a run that never beats the stage-1 model keeps it."""
    losses = {"base": 1.0, 0: 1.3, 1: 1.2, 2: 1.1, 3: 1.05, 4: 0.5, 5: 0.6, 6: 0.6, 7: 0.6}
    _, history = _scripted_run(tiny_weights, monkeypatch, losses, epochs=8)
    assert history.best_epoch == 4 and len(history.val_loss) == 8 and history.stopped_early

    monkeypatch.undo()  # the scripted validation wraps the real one, not the first script
    worse = {"base": 1.0, 0: 1.3, 1: 1.2, 2: 1.25, 3: 1.25, 4: 1.25, 5: 0.1}
    before = _state(_net(tiny_weights))
    net, history = _scripted_run(tiny_weights, monkeypatch, worse, epochs=8)
    assert len(history.val_loss) == 5 and history.stopped_early  # three epochs without bettering epoch 1
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the stage-1 weights are kept


def _scripted_run(tiny_weights, monkeypatch, losses: dict, epochs: int):
    """Fine-tune the tiny net's top 2 stages on synthetic data, with validation losses scripted by epoch."""
    cfg = ft.FinetuneConfig(unfreeze=2, epochs=epochs, views=1, lr=1e-2, head_lr=1e-2, batch_size=4)
    net = _net(tiny_weights)
    data = _synthetic_split(net, N_STAGES - 2, 6, seed=0)
    sink = EpochCounter()
    _scripted_validation(monkeypatch, sink, losses)
    return net, ft.finetune(net, _head_for(net), cfg, data, data, checkpoint_dir=None, resume=False, progress=sink)


def test_resume_restores_best_weights_and_early_stopping_state(tiny_weights, tmp_path, monkeypatch):
    """The best epoch (0) lies before the interruption (after epoch 1) and patience runs out after it (epoch 2):
    the resumed run must end with epoch 0's weights, stop where the uninterrupted run stopped, and train its
    remaining epoch on the same batches (several per epoch, so the shuffling RNG matters)."""
    losses = {"base": 1.0, 0: 0.5, 1: 0.9, 2: 0.8, 3: 0.1}
    cfg = ft.FinetuneConfig(unfreeze=2, epochs=4, views=2, lr=1e-2, head_lr=1e-2, batch_size=4, patience=2)

    def run(sink, ckpt, resume=False):
        net = _net(tiny_weights)
        data = _synthetic_split(net, N_STAGES - 2, 10, seed=0)
        data["acts"] = np.concatenate([data["acts"], data["acts"][::-1]], 1)  # two "views"
        data["taps"] = np.concatenate([data["taps"], data["taps"][::-1]], 1)
        head = _head_for(net)
        with monkeypatch.context() as mp:
            _scripted_validation(mp, sink, losses)
            history = ft.finetune(net, head, cfg, data, data, checkpoint_dir=ckpt, resume=resume, progress=sink)
        return history, {**net.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}

    whole_history, whole = run(EpochCounter(), tmp_path / "A")
    assert whole_history.best_epoch == 0 and whole_history.stopped_early and len(whole_history.val_loss) == 3
    with pytest.raises(KeyboardInterrupt):
        run(EpochCounter(die_after=2), tmp_path / "B")
    assert json.loads((tmp_path / "B" / "state.json").read_text())["epoch"] == 1
    sink = EpochCounter()
    history, resumed = run(sink, tmp_path / "B", resume=True)
    assert sink.epoch == 3  # resumed at epoch 2 and stopped after it, as the uninterrupted run did
    assert history.to_dict() == whole_history.to_dict()
    for k, v in whole.items():
        assert torch.equal(resumed[k], v), k



def test_resume_refuses_a_checkpoint_made_with_other_settings(tiny_weights, tmp_path, monkeypatch):
    net = _net(tiny_weights)
    data = _synthetic_split(net, N_STAGES - 1, 6, seed=0)
    cfg = ft.FinetuneConfig(unfreeze=1, epochs=2, views=1, batch_size=4)
    with monkeypatch.context() as mp:
        _interrupt_at_validation(mp, call=3)
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(net, _head_for(net), cfg, data, data, checkpoint_dir=tmp_path / "ck")
    net = _net(tiny_weights)
    other = ft.FinetuneConfig(unfreeze=1, epochs=2, views=1, batch_size=4, lr=1e-3)
    with pytest.raises(checkpoint.CheckpointError) as err:
        ft.finetune(net, _head_for(net), other, data, data, checkpoint_dir=tmp_path / "ck", resume=True)
    assert_one_line(" ".join(str(err.value).split()), "--resume")


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    import headstart.train.finetune as ft
    real = ft._validate
    def slow(*args, **kwargs):  # slows epochs down (not their numbers) so the kill lands mid-run
        out = real(*args, **kwargs)
        time.sleep(0.4)
        return out
    ft._validate = slow
    from headstart import ImageClassifier
    weights, data, ckpt = sys.argv[1:4]
    ImageClassifier("{backbone}", weights=weights, **{params!r}).fit(data, checkpoint_dir=ckpt)
    print("finished")
""")


def test_resume_after_sigkill_matches_an_uninterrupted_run(make_clf, tiny_weights, image_folder, tmp_path):
    settings = dict(finetune_epochs=4, views=2, batch_size=8)
    params = make_clf(**settings).get_params()
    params.pop("backbone"), params.pop("weights")
    ckpt = tmp_path / "killed" / "checkpoint"
    code = _KILLED_RUN.format(backbone=TINY_BACKBONE, params=params)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_weights), str(image_folder), str(ckpt)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "state.json").exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out
    epoch_done = json.loads((ckpt / "state.json").read_text())["epoch"]
    assert epoch_done < settings["finetune_epochs"] - 1

    files = _images(image_folder)
    with pytest.MonkeyPatch.context() as mp:
        calls = _interrupt_at_validation(mp, call=-1)  # counts only
        resumed = make_clf(**settings).fit(image_folder, checkpoint_dir=ckpt, resume=True)
    assert calls[0] == 1 + settings["finetune_epochs"] - (epoch_done + 1)  # only the epochs the kill cost
    whole = make_clf(**settings).fit(image_folder, checkpoint_dir=tmp_path / "whole")
    assert resumed.decision_["finetune_history"] == whole.decision_["finetune_history"]
    np.testing.assert_allclose(resumed.predict_proba(files), whole.predict_proba(files), atol=1e-6, rtol=0)


def _assert_safetensors_layout(path: Path) -> None:
    """The file is nothing but safetensors: an 8-byte header length, a JSON header, raw tensor bytes (no pickle)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert len(raw) == 8 + n + max(ends, default=0)


def test_checkpoint_is_pickle_free_and_checks_its_pair(tmp_path):
    assert checkpoint.load(tmp_path / "none") is None
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "rng.torch": torch.get_rng_state()}
    checkpoint.save(tmp_path / "ck", tensors, {"epoch": 3, "history": {"val_loss": [0.5]}})
    meta = json.loads((tmp_path / "ck" / checkpoint.META).read_text())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([meta["tensors"], checkpoint.META])
    _assert_safetensors_layout(tmp_path / "ck" / meta["tensors"])
    assert meta["epoch"] == 3 and len(meta["tensors_sha256"]) == 64
    loaded, meta = checkpoint.load(tmp_path / "ck")
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["rng.torch"], tensors["rng.torch"])

    # Killed after the next tensor file landed but before its JSON: the previous pair still loads.
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 3)}, str(tmp_path / "ck" / "state-ffffffffffffffff.safetensors"))
    loaded, meta = checkpoint.load(tmp_path / "ck")
    assert meta["epoch"] == 3 and torch.equal(loaded["w"], tensors["w"])

    # A tensor file that no longer matches the digest its JSON names is refused, with what to do.
    save_file({"w": torch.ones(2, 3)}, str(tmp_path / "ck" / meta["tensors"]))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(tmp_path / "ck")
    assert "--resume" in str(err.value)


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = checkpoint.optimizer_state(opt)
    checkpoint.save(tmp_path, tensors, {"optimizer": meta})
    loaded, meta = checkpoint.load(tmp_path)
    fresh = torch.optim.AdamW([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    checkpoint.restore_optimizer(fresh, loaded, meta["optimizer"])
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for name, v in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][name])), (pid, name)



def test_restored_moments_take_their_channels_last_parameter_layout_and_the_next_step_matches(tmp_path):
    """A 3x3 convolution over 3 channels (the stem) in channels_last: its moments come back from safetensors
    contiguous, and the fused step pairs elements by memory order, so the layout must be restored."""
    def step(conv, opt):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(len(opt.state))).contiguous(
            memory_format=torch.channels_last)
        conv(x).square().sum().backward()
        opt.step()
        opt.zero_grad()

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True)
    step(conv, opt)
    tensors, meta = checkpoint.optimizer_state(opt)
    checkpoint.save(tmp_path, tensors, {"optimizer": meta})
    twin = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    twin.load_state_dict(conv.state_dict())
    fresh = torch.optim.AdamW(twin.parameters(), lr=0.1, fused=True)
    loaded, meta = checkpoint.load(tmp_path)
    checkpoint.restore_optimizer(fresh, loaded, meta["optimizer"])
    assert fresh.state[twin.weight]["exp_avg"].stride() == twin.weight.stride()
    step(conv, opt)
    step(twin, fresh)
    assert torch.equal(conv.weight, twin.weight) and torch.equal(conv.bias, twin.bias)

# --- 7. the auto strategy ----------------------------------------------------------------------------------------

def test_decide_auto_reasons():
    n = strategy.AUTO_MIN_TRAIN_IMAGES
    run, why = strategy.decide_auto(n + 20, False, None)
    assert not run and "no validation" in why
    run, why = strategy.decide_auto(n - 1, True, 0.5)
    assert not run and f"only {n - 1} training images" in why
    run, why = strategy.decide_auto(n, True, strategy.AUTO_HEAD_GOOD_ENOUGH)
    assert not run and "head alone" in why
    run, why = strategy.decide_auto(n, True, 0.5)
    assert run and why
    assert strategy.decide_auto(n, True, None)[0]


def test_auto_keeps_the_head_when_there_are_too_few_images(make_clf, image_folder, tiny_weights, monkeypatch):
    def no_stage2(*args, **kwargs):
        raise AssertionError("stage 2 ran")

    monkeypatch.setattr(strategy, "run_finetune", no_stage2)
    clf = make_clf(strategy="auto").fit(image_folder)
    assert clf.decision_["strategy"] == "auto" and clf.decision_["kept"] == "head"
    assert f"only 15 training images (< {strategy.AUTO_MIN_TRAIN_IMAGES})" in clf.decision_["reason"]
    assert clf.frozen_.weights == Path(tiny_weights)


def test_auto_stage2_decision_is_saved(make_clf, image_folder, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(strategy, "AUTO_MIN_TRAIN_IMAGES", 1)
    monkeypatch.setattr(strategy, "AUTO_HEAD_GOOD_ENOUGH", 2.0)
    clf = make_clf(strategy="auto").fit(image_folder)
    clf.save(tmp_path / "m")
    decision = json.loads((tmp_path / "m" / "headstart.json").read_text())["decision"]
    assert decision["strategy"] == "auto" and decision["kept"] in ("head", "finetune")
    assert isinstance(decision["head_val_accuracy"], float) and isinstance(decision["finetune_val_accuracy"], float)
    if decision["finetune_val_accuracy"] > decision["head_val_accuracy"]:
        assert decision["kept"] == "finetune"
    if decision["finetune_val_accuracy"] < decision["head_val_accuracy"]:
        assert decision["kept"] == "head"
    saved = read_state_dict(tmp_path / "m" / "model.safetensors")
    pretrained = read_state_dict(tiny_weights)
    same = all(torch.equal(saved[f"backbone.{k}"], v) for k, v in pretrained.items() if f"backbone.{k}" in saved)
    assert same == (decision["kept"] == "head")


@pytest.mark.parametrize("refit_better", [True, False])
def test_a_refitted_head_is_kept_only_when_it_validates_better(make_clf, image_folder, monkeypatch, refit_better):
    """After stage 2 a new head is fitted on the tuned backbone's features; the lower validation log loss wins."""
    real = strategy.refit_head
    made = {}

    def refit(*args, **kwargs):
        out = real(*args, **kwargs)
        proba, y = out.val
        sure = np.full(proba.shape, 0.01 / (proba.shape[1] - 1))
        sure[np.arange(len(y)), y] = 0.99
        out.val = (sure if refit_better else np.roll(sure, 1, axis=1), y)  # all right, or all wrong
        made["refit"] = out
        return out

    monkeypatch.setattr(strategy, "refit_head", refit)
    clf = make_clf().fit(image_folder)
    out, decision = made["refit"], clf.decision_
    assert decision["kept"] == "finetune" and decision["refit"]["kept"] is refit_better
    assert [c["hidden"] for c in decision["refit"]["candidates"]] == [[]]  # 15 photos: too few for a hidden layer
    if refit_better:
        assert clf.val_metrics_.log_loss == pytest.approx(-np.log(0.99))
    else:
        assert clf.val_metrics_.log_loss < decision["refit"]["val_log_loss"] == pytest.approx(-np.log(0.005))
    assert decision["finetune_val_accuracy"] == clf.val_metrics_.accuracy
    same_head = all(np.array_equal(v, clf.head_state_[k]) for k, v in out.head_state.items())
    assert same_head is refit_better


# --- 8. saving a fine-tuned model ------------------------------------------------------------------------------

def test_fine_tuned_model_saves_its_backbone_and_predicts_the_same_after_load(
        make_clf, image_folder, tiny_weights, tmp_path, monkeypatch):
    with monkeypatch.context() as mp:
        _always_improving(mp)  # the last epoch's weights are kept, whatever the tiny random model learns
        clf = make_clf().fit(image_folder)
    files = _images(image_folder)
    before = clf.predict_proba(files)
    clf.save(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "headstart.json").read_text())
    decision = info["decision"]
    assert decision["strategy"] == "finetune" and decision["kept"] == "finetune"
    assert isinstance(decision["head_val_accuracy"], float) and isinstance(decision["finetune_val_accuracy"], float)
    assert decision["finetune_history"]["best_epoch"] == 1  # a trained epoch was kept

    loaded = ImageClassifier.load(tmp_path / "m", device="cpu")
    np.testing.assert_allclose(loaded.predict_proba(files), before, atol=1e-5, rtol=0)

    # The saved backbone is the fine-tuned one: frozen stages and (without train_bn) every BatchNorm statistic
    # as pretrained, the top stages' convolutions changed.
    saved = {k[len("backbone."):]: v for k, v in read_state_dict(tmp_path / "m" / "model.safetensors").items()
             if k.startswith("backbone.")}
    pretrained = {k: v for k, v in read_state_dict(tiny_weights).items() if not k.startswith("classifier.")}
    assert set(saved) == set(pretrained)
    boundary = N_STAGES - 2
    for k, v in pretrained.items():
        if _stage_of(k) < boundary or _is_bn_stat(k):
            assert torch.equal(saved[k], v), k
        elif _is_conv_weight(k):
            assert not torch.equal(saved[k], v), f"{k} was not fine-tuned"


# --- 9. the command line -----------------------------------------------------------------------------------------

def test_cli_trains_a_fine_tuned_model(tiny_weights, ft_cache, image_folder, tmp_path):
    from typer.testing import CliRunner

    from headstart.cli.commands import app

    out = tmp_path / "m"
    result = CliRunner().invoke(app, [
        "train", str(image_folder), "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--epochs", "3",
        "--device", "cpu", "--strategy", "finetune", "--finetune-epochs", "1", "--views", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert (out / "model.safetensors").exists() and (out / "headstart.json").exists()
    assert not (out / "checkpoint").exists()
    info = json.loads((out / "headstart.json").read_text())
    assert info["decision"]["kept"] == "finetune" and info["params"]["unfreeze"] == "auto"
    assert info["decision"]["finetune_config"]["unfreeze"] == 2  # auto: the top two stages at the standard size


@pytest.mark.parametrize("value", ["0", "banana", "-1", ""])
def test_cli_refuses_a_bad_unfreeze(image_folder, tmp_path, value):
    from typer.testing import CliRunner

    from headstart.cli.commands import app

    result = CliRunner().invoke(app, ["train", str(image_folder), "--strategy", "finetune", "--unfreeze", value,
                                      "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert_one_line(result.stderr.strip(), "--unfreeze")
    assert not (tmp_path / "m").exists()


def test_cli_unfreeze_beyond_the_backbone_is_one_line(tiny_weights, ft_cache, image_folder, tmp_path):
    """More stages than this backbone has passes the flag check; fine-tuning then refuses it as a user error."""
    from typer.testing import CliRunner

    from headstart.cli.commands import app

    result = CliRunner().invoke(app, [
        "train", str(image_folder), "--backbone", TINY_BACKBONE, "--weights", str(tiny_weights), "--epochs", "2",
        "--device", "cpu", "--strategy", "finetune", "--unfreeze", str(N_STAGES + 1), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert_one_line(result.stderr.strip(), "--unfreeze", f"1..{N_STAGES}")


def test_auto_keeps_the_head_when_the_backbone_cannot_be_fine_tuned(tmp_path, monkeypatch):
    """A ResNet has no EfficientNet stage layout: auto says so and keeps the head; finetune refuses in one line."""
    import timm
    from safetensors.torch import save_file

    from headstart.train import stage2 as strategy
    from headstart.errors import FinetuneError

    monkeypatch.setattr(strategy, "AUTO_MIN_TRAIN_IMAGES", 1)
    monkeypatch.setattr(strategy, "AUTO_HEAD_GOOD_ENOUGH", 1.01)  # stage 2 would run if the backbone allowed it
    weights = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(weights))
    data = make_image_folder(tmp_path / "photos", per_class=6)
    clf = ImageClassifier(backbone="test_resnet", weights=weights, strategy="auto", epochs=3).fit(data)
    assert clf.decision_["kept"] == "head"
    assert "cannot be fine-tuned" in clf.decision_["reason"]
    with pytest.raises(FinetuneError) as err:
        ImageClassifier(backbone="test_resnet", weights=weights, strategy="finetune", epochs=3).fit(data)
    assert "\n" not in str(err.value)


def test_test_split_is_scored_with_the_fine_tuned_backbone(tiny_weights, tmp_path):
    """After stage 2 the held-out test metrics come from the model that is kept, not the stage-1 features."""
    data = make_image_folder(tmp_path / "photos", per_class=12)
    clf = ImageClassifier(backbone=TINY_BACKBONE, weights=tiny_weights, strategy="finetune", test_split=0.25,
                          epochs=3, finetune_epochs=1, views=1).fit(data)
    assert clf.decision_["kept"] == "finetune" and clf.test_metrics_ is not None
    from headstart.data.scan import scan_folder
    from headstart.evaluate.metrics import evaluate

    test = scan_folder(data, val_split=0.2, test_split=0.25, seed=0)
    expected = evaluate(test.labels("test"), clf.predict_proba(test.paths("test")), clf.classes_)  # from pixels
    assert clf.test_metrics_.n == expected.n == 9
    assert clf.test_metrics_.log_loss == pytest.approx(expected.log_loss, abs=1e-4)
