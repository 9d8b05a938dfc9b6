"""A backbone with definite weights, and the engine that runs it: what feature caches are keyed by."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from headstart.backbones.registry import BackboneSpec
from headstart.backbones.weights import create_model, pretrained_weights_path, weights_fingerprint
from headstart.errors import UserError
from headstart.paths import disk_full_error, short_of_room, store_key
from headstart.runtime import quantize
from headstart.runtime.device import int8_is_fast, pick_device
from headstart.runtime.engines import (
    ONNX_CPU,
    Engine,
    OnnxEngine,
    OrientedEngine,
    StackedEngine,
    TorchEngine,
    ViewsEngine,
    any_size_path,
    joined_kind,
    torch_kind,
)
from headstart.runtime.export import export_onnx, known_failure, onnx_path_for, open_cached, remember_failure

log = logging.getLogger(__name__)

NATIVE_SIZE_PROBES = (64, 160)  # input sizes a graph that takes any size must also agree with torch at
ENGINES = ("fp32", "int8")  # what the `engine` setting's `auto` chooses between (see `resolve_engine`)
# `auto` chooses int8 where the CPU has VNNI (`int8_is_fast`), float32 elsewhere. Measured by bench/engine.py
# (cold flowers trains, medians of 2): on a 2-core EPYC with AVX-512 VNNI, int8 trained 1.56x faster in wall time
# (1.66x in CPU; extraction 251 against 145 images/s), its head 0.7686 against float32's 0.7733 on flowers and
# 0.9542 against 0.9608 on hymenoptera (one photo of 153). On a 2-core AVX2-only EPYC it was 1.03x: not worth it.
# `--engine int8` asks for it anywhere, `--engine fp32` keeps float32.


@dataclass(frozen=True)
class EngineChoice:
    """What a command's engine is, decided once (`resolve_engine`): the device it runs on and the CPU engine the
    `engine` setting means here. `kind`, the part of the feature cache's key that names what computes the
    features, is read from the cache folder each time it is asked, as the first int8 run's calibration or a
    failed export changes it within a command. The engine itself is opened only when features are missing."""

    device: str  # "cpu", "cuda", "cuda:1": picked, never "auto"
    name: str  # "fp32" or "int8": what runs on the CPU
    export: Path  # the float ONNX export the CPU engines are made from

    @property
    def kind(self) -> str:
        """`runtime.engines.ONNX_CPU`, an int8 kind or a torch kind, known without opening the engine: a cached
        export means ONNX Runtime, a remembered failed one float32 torch; before the first export ONNX Runtime
        (the engine says so itself if the export then fails)."""
        if self.device != "cpu":
            return torch_kind(self.device)
        if not self.export.exists() and known_failure(self.export) is not None:
            return torch_kind("cpu")
        if self.name == "int8":
            return quantize.expected_kind(self.export)
        return ONNX_CPU


def resolve_engine(frozen: FrozenBackbone, device: str, setting: str) -> EngineChoice:
    """The engine `frozen` runs on `device` for an `engine` setting: `auto` is int8 where the CPU runs it clearly
    faster (`int8_is_fast`), else float32. Called once per command: `with_engine` keeps it on the backbone."""
    name = ("int8" if int8_is_fast() else "fp32") if setting == "auto" else setting
    return EngineChoice(pick_device(device), name, onnx_path_for(frozen.spec, frozen.weights_id))


@dataclass(frozen=True)
class FrozenBackbone:
    """A backbone with definite weights: what a feature cache is keyed by."""

    spec: BackboneSpec
    weights: Path  # timm-layout safetensors
    weights_id: str
    weights_prefix: str = ""  # key prefix inside the weights file (a saved model stores "backbone.")
    engine_name: str = "fp32"  # on the CPU: "fp32" (float ONNX Runtime) or "int8" (`runtime.quantize`)
    # A second pretrained backbone run on the same inputs, its features after this one's (`with_companion`)
    companion: "FrozenBackbone | None" = None
    choice: EngineChoice | None = field(default=None, compare=False, repr=False)  # `with_engine`'s, for one command

    @classmethod
    def pretrained(cls, spec: BackboneSpec, weights: Path | None = None) -> "FrozenBackbone":
        weights = Path(weights) if weights else pretrained_weights_path(spec)
        return cls(spec, weights, weights_fingerprint(weights))

    def with_engine(self, setting: str, device: str = "auto") -> "FrozenBackbone":
        """This backbone run on `device` by the engine `setting` names: the command's one `resolve_engine`, kept
        for every later `engine` and `engine_kind`. No photos of the run: int8 calibrates on a fixed reference
        set (`quantize.reference_batches`), so a run's features do not depend on what a cache saw before."""
        choice = resolve_engine(replace(self, choice=None), device, setting)
        companion = self.companion.with_engine(setting, device) if self.companion else None
        return replace(self, engine_name=choice.name, choice=choice, companion=companion)

    def with_companion(self, other: "FrozenBackbone") -> "FrozenBackbone":
        """This backbone with `other` beside it: `other` sees the inputs this one sees (this one's preprocessing,
        upright: orientations average the two together) and its pooled features follow this one's."""
        pre = replace(self.spec.preprocess, orientations=1)
        companion = replace(other, spec=replace(other.spec, preprocess=pre), companion=None)
        return replace(self, companion=companion.with_engine(self.engine_name, self._choice("auto").device))

    def alone(self) -> "FrozenBackbone":
        """This backbone without its companion."""
        return replace(self, companion=None)

    def _choice(self, device: str) -> EngineChoice:
        """The command's engine choice for `device` ("auto": the one `with_engine` made); resolved afresh only
        for another device, or for a backbone that was never given one."""
        if self.choice is not None and device in ("auto", self.choice.device):
            return self.choice
        return resolve_engine(self, device, self.engine_name)

    def build_torch(self):
        """The feature network as torch: the backbone with its multi-scale pooling."""
        from headstart.backbones.pooled import PooledFeatures, StackedFeatures

        model = create_model(self.spec, self.weights, prefix=self.weights_prefix)
        if self.companion is not None:
            return StackedFeatures(model, self.companion.build_torch()).eval()
        return PooledFeatures(model).eval()

    def engine(self, device: str = "auto", spinning: bool = True) -> Engine:
        """ONNX Runtime on the CPU (the export made once and cached; float32 torch when the export fails), torch
        elsewhere. Its `kind` is what `engine_kind` foretells. With `orientations` > 1 in the preprocessing, the
        features are averaged over each batch's orientations (`OrientedEngine`). With a companion, its features
        follow this backbone's (`StackedEngine`); the two float32 sessions take turns, so neither spins while idle
        (see `ViewsEngine`)."""
        if self.spec.preprocess.orientations > 1:
            return OrientedEngine(self.upright().engine(device), self.spec.preprocess.orientations)
        if self.companion is not None:
            return StackedEngine(self.alone().engine(device, False), self.companion.engine(device, False))
        device = self._choice(device).device
        if device != "cpu":
            return TorchEngine(self.build_torch(), device)
        path = onnx_path_for(self.spec, self.weights_id)
        twins = (any_size_path(path),) if self.spec.any_input_size else ()
        exported = path.exists() and all(twin.exists() for twin in twins)
        if self.engine_name == "int8" and exported and (int8 := self._int8_engine(path, twins)) is not None:
            return int8
        fp32 = self._fp32_engine(path, twins, device, spinning)
        if self.engine_name == "int8" and not exported and not isinstance(fp32, TorchEngine):
            return self._int8_engine(path, twins) or fp32  # exported just now
        return fp32

    def upright(self) -> "FrozenBackbone":
        """This backbone seeing each photo once, as it stands (its engine choice kept)."""
        return replace(self, spec=replace(self.spec, preprocess=replace(self.spec.preprocess, orientations=1)))

    def oriented(self, n: int = 8) -> "FrozenBackbone":
        """This backbone averaging each photo's features over its first `n` orientations (`ORIENTATIONS`): all
        eight turns and mirror images, or (2) the photo and its mirror image."""
        return replace(self, spec=replace(self.spec, preprocess=replace(self.spec.preprocess, orientations=n)))

    def _fp32_engine(self, path: Path, twins: tuple[Path, ...], device: str, spinning: bool = True) -> Engine:
        if self.spec.preprocess.native_size:
            def open_engine() -> Engine:
                return ViewsEngine(path, self.spec.preprocess.input_size)
        else:
            def open_engine() -> Engine:
                return OnnxEngine(path, spinning=spinning)
        try:
            return open_cached(path, open_engine, lambda: self._export(path), twins)
        except RuntimeError as exc:  # a network the exporter cannot reproduce: slower, but right
            log.warning("%s: %s; extracting features with PyTorch instead of ONNX Runtime", self.spec.name, exc)
            return TorchEngine(self.build_torch(), device)

    def _int8_engine(self, path: Path, twins: tuple[Path, ...]) -> Engine | None:
        """The int8 engine of the float export at `path`; None (float32 then) when it cannot be made."""
        try:
            return quantize.int8_engine(path, twins[0] if twins else None, self.spec.preprocess)
        except UserError:
            raise  # a full disk is the user's to fix, whichever engine
        except Exception as exc:  # onnxruntime's quantizer raises its own types, or Exception itself
            log.warning("%s: int8 quantization failed (%s); extracting features in float32",
                        self.spec.name, " ".join(str(exc).split())[:200])
            return None

    def _export(self, path: Path) -> None:
        if (reason := known_failure(path)) is not None:
            raise RuntimeError(reason)  # failed before, with this toolchain: not another half a minute
        log.info("exporting %s to ONNX once (cached in %s)", self.spec.name, path.parent)
        try:
            export_onnx(self.build_torch(), self.spec.preprocess.input_size, path,
                        other_sizes=NATIVE_SIZE_PROBES if self.spec.any_input_size else (), like=self._like(path))
        except RuntimeError as exc:
            if (full := disk_full_error(exc, path) or short_of_room(path)) is not None:
                raise full from exc  # not the network's fault: neither remembered nor worked around
            remember_failure(path, str(exc))
            raise

    def _like(self, path: Path) -> list[Path]:
        """Cached float exports of this architecture to make this one from (`runtime.reweight`): its any-size
        graphs (every backbone that fine-tunes has them; int8 variants are named otherwise), the newest first, two
        at most, as each costs a parity check when it fails."""
        found = [p for p in path.parent.glob(f"{self.spec.timm_name}-*-any.onnx") if p.is_file()]
        return sorted(found, key=lambda p: -p.stat().st_mtime)[:2]

    def engine_kind(self, device: str = "auto") -> str:
        """The kind of engine `engine(device)` gives (see `runtime.engines.ONNX_CPU`), known without making it."""
        kind = self._choice(device).kind
        return joined_kind(kind, self.companion.engine_kind(device)) if self.companion is not None else kind

    def feature_key_parts(self, engine_kind: str = ONNX_CPU) -> dict:
        """What this backbone's features depend on: the architecture, the weights' content, the preprocessing
        and the kind of engine computing them (the features' version is added by `paths.store_key`). ONNX
        Runtime's features are keyed without an engine, as they were before engines were told apart, so the
        caches already on users' disks stay valid."""
        parts = dict(timm=self.spec.timm_name, w=self.weights_id, pre=self.spec.preprocess.to_dict())
        if self.companion is not None:
            parts["companion"] = dict(timm=self.companion.spec.timm_name, w=self.companion.weights_id)
        if engine_kind != ONNX_CPU:
            parts["engine"] = engine_kind
        return parts

    def cache_key(self, engine_kind: str = ONNX_CPU) -> str:
        """The content key of this backbone's features: two backbones with equal keys share a feature cache."""
        return store_key("features", self.feature_key_parts(engine_kind))
