"""A backbone with definite weights, and the engine that runs it: what feature caches are keyed by."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from headstart.backbones.registry import BackboneSpec
from headstart.backbones.weights import create_model, pretrained_weights_path, weights_fingerprint
from headstart.paths import store_key
from headstart.runtime.device import pick_device
from headstart.runtime.engines import Engine, OnnxEngine, TorchEngine, ViewsEngine, any_size_path
from headstart.runtime.export import export_onnx, onnx_path_for

log = logging.getLogger(__name__)

NATIVE_SIZE_PROBES = (64, 160)  # input sizes a graph that takes any size must also agree with torch at


@dataclass(frozen=True)
class FrozenBackbone:
    """A backbone with definite weights: what a feature cache is keyed by."""

    spec: BackboneSpec
    weights: Path  # timm-layout safetensors
    weights_id: str
    weights_prefix: str = ""  # key prefix inside the weights file (a saved model stores "backbone.")

    @classmethod
    def pretrained(cls, spec: BackboneSpec, weights: Path | None = None) -> "FrozenBackbone":
        weights = Path(weights) if weights else pretrained_weights_path(spec)
        return cls(spec, weights, weights_fingerprint(weights))

    def build_torch(self):
        """The feature network as torch: the backbone with its multi-scale pooling."""
        from headstart.backbones.pooled import PooledFeatures

        return PooledFeatures(create_model(self.spec, self.weights, prefix=self.weights_prefix)).eval()

    def engine(self, device: str = "auto") -> Engine:
        device = pick_device(device)
        if device != "cpu":
            return TorchEngine(self.build_torch(), device)
        path = onnx_path_for(self.spec, self.weights_id)
        any_size = self.spec.any_input_size
        if not path.exists() or (any_size and not any_size_path(path).exists()):
            log.info("exporting %s to ONNX once (cached in %s)", self.spec.name, path.parent)
            try:
                export_onnx(self.build_torch(), self.spec.preprocess.input_size, path,
                            other_sizes=NATIVE_SIZE_PROBES if any_size else ())
            except RuntimeError as exc:  # a network the exporter cannot reproduce: slower, but right
                log.warning("%s: %s; extracting features with PyTorch instead of ONNX Runtime", self.spec.name, exc)
                return TorchEngine(self.build_torch(), device)
        if self.spec.preprocess.native_size:
            return ViewsEngine(path, self.spec.preprocess.input_size)
        return OnnxEngine(path)

    def feature_key_parts(self) -> dict:
        """What this backbone's features depend on: the architecture, the weights' content and the preprocessing
        (the features' version is added by `paths.store_key`)."""
        return dict(timm=self.spec.timm_name, w=self.weights_id, pre=self.spec.preprocess.to_dict())

    def cache_key(self) -> str:
        """The content key of this backbone's features: two backbones with equal keys share a feature cache."""
        return store_key("features", self.feature_key_parts())
