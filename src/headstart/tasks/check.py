"""`headstart check`: what is wrong with a folder of photos, before a training run finds out the hard way.

Every finding is a `Finding` naming its files. Those with severity "error" block (`--strict` exits 1 on them):
files that cannot be used, one photo under two labels, and the same photo on both sides of a split (leakage:
the validation score is then partly a training score). The rest warn: exact and near-duplicates within a
split, class imbalance, tiny, extreme-aspect and low-information images, mixed colour modes, file names whose
extension lies about the format, and the likely label errors of `evaluate.labels`.

Looking at the files reads each one's header and a 64 px decode (JPEGs are decoded at a reduced DCT scale),
so it costs a fraction of a feature extraction. Near-duplicates and label errors need the backbone's features:
they are computed when the features are cached already (after `train`), or always with `deep=True`.

Near-duplicates are pairs whose centred, L2-normalised features have a cosine similarity of at least
NEAR_DUPLICATE_COSINE, the exact duplicates (equal content keys) aside. Measured with efficientnet_lite0 on
hymenoptera/train (245 photos; bench/understand.py measures it again): of 21 photos' edited copies, those
re-encoded as JPEG at quality 50 score a median 0.935 against their original (90 % at or above 0.85), resized
to half 0.896 (86 %), cropped by 10 % 0.945 (100 %), brightened by 20 % 0.986 (100 %); of the 29,890 pairs of
distinct photos none reaches 0.85 (the highest 0.80, 99.9 % below 0.66).
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.data.dataset import Dataset
from headstart.data.imageio import IMAGE_FORMATS, ImageDecodeError, is_image_path, load_rgb
from headstart.data.scan import scan_folder

log = logging.getLogger(__name__)

NEAR_DUPLICATE_COSINE = 0.85  # see the module's doc for how it was measured
IMBALANCE_RATIO = 3.0  # largest class over smallest: beyond this the head favours the large classes visibly
TINY_SIDE = 32  # px on the short side: upsampled 7x into a 224 px input, there is little left to see
EXTREME_ASPECT = 3.0  # long side over short: the centre crop then keeps a third of the photo or less
LOW_INFO_STD = 4.0  # grey-level standard deviation (0-255) of the 64 px view: a blank or black frame
THUMB = 64
ERROR, WARNING = "error", "warning"

_FORMATS_OF = {".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".png": {"PNG"}, ".bmp": {"BMP"}, ".gif": {"GIF"},
               ".webp": {"WEBP"}, ".tif": {"TIFF"}, ".tiff": {"TIFF"}}


@dataclass(frozen=True)
class Finding:
    """One problem, the files it is about, and how sure or serious it is."""

    kind: str  # unreadable, conflicting_labels, leakage, duplicate, near_duplicate, imbalance, tiny, ...
    severity: str  # ERROR blocks `check --strict`; WARNING does not
    message: str
    files: tuple[Path, ...]
    score: float | None = None  # a similarity, or the probability of the given label, where there is one


@dataclass(frozen=True)
class CheckReport:
    root: Path
    classes: tuple[str, ...]
    counts: dict[str, dict[str, int]]  # split -> class -> images found
    findings: tuple[Finding, ...]
    backbone: str | None  # whose features near-duplicates and label errors came from; None: not looked at
    notes: tuple[str, ...] = ()
    near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE

    @property
    def blocking(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == ERROR)

    def to_dict(self) -> dict:
        """Plain JSON types: paths as strings."""
        out = asdict(self)
        out["root"] = str(self.root)
        out["findings"] = [{**asdict(f), "files": [str(p) for p in f.files]} for f in self.findings]
        out["blocking"] = len(self.blocking)
        return out


@dataclass(frozen=True)
class ImageFacts:
    """What the header and a small decode say about one file; `error` set when it cannot be used."""

    path: Path
    format: str = ""
    mode: str = ""
    size: tuple[int, int] = (0, 0)
    grey_std: float = 0.0
    error: str | None = None


def inspect_image(path: Path) -> ImageFacts:
    """The file's format, colour mode and size from its header, and the grey-level spread of a small decode."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            fmt, mode, size = img.format or "", img.mode, img.size
        small = load_rgb(path, target_short_side=THUMB)
        small.thumbnail((THUMB, THUMB))
        grey = np.asarray(small.convert("L"), np.float32)
    except ImageDecodeError as exc:
        return ImageFacts(path, error=str(exc))
    except Exception as exc:  # Pillow's many ways of saying "bad file", before load_rgb names it
        return ImageFacts(path, error=f"cannot be decoded ({type(exc).__name__})")
    return ImageFacts(path, fmt, mode, size, float(grey.std()))


def check_folder(data: str | Path, val_split: float = 0.2, test_split: float = 0.0, seed: int = 0,
                 backbone: str | None = "efficientnet_lite0", weights: Path | None = None, device: str = "auto",
                 deep: bool = False, progress=None, engine: str = "auto") -> CheckReport:
    """Every finding about the folder `data`, scanned and split as `train` would with the same settings; its
    features are looked for as `train` with the same `engine` setting cached them."""
    from headstart.cache.features import content_keys
    from headstart.progress import NoProgress

    progress = progress or NoProgress()
    dataset = scan_folder(data, val_split=val_split, test_split=test_split, seed=seed)
    samples = list(dataset.samples)
    paths = [s.path for s in samples]
    progress.start("checking images", len(paths))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        facts = []
        for fact in pool.map(inspect_image, paths):  # Pillow decodes without the GIL
            facts.append(fact)
            progress.advance(1)
    progress.finish()
    keys, key_failures = content_keys(paths)
    findings = skipped_findings(dataset.skipped)
    findings += [Finding("unreadable", ERROR, reason, (paths[i],)) for i, reason in key_failures.items()]
    findings += [Finding("unreadable", ERROR, f.error, (f.path,)) for i, f in enumerate(facts)
                 if f.error and i not in key_failures]
    findings += duplicate_findings(dataset, keys)
    findings += imbalance_findings(dataset)
    findings += image_findings([f for f in facts if not f.error])
    findings += mode_findings(dataset, [f for f in facts if not f.error])
    notes: list[str] = []
    used = None
    if backbone:
        feats = _features(dataset, keys, backbone, weights, device, deep, progress, notes, engine)
        if feats is not None:
            used = backbone
            findings += near_duplicate_findings(feats.paths, feats.features, feats.splits, _by_key(paths, keys))
            findings += label_findings(feats, dataset.classes)
    order = {ERROR: 0, WARNING: 1}
    findings.sort(key=lambda f: (order[f.severity], f.kind))
    return CheckReport(dataset.root, dataset.classes, _counts(dataset), tuple(findings), used, tuple(notes))


def _counts(dataset: Dataset) -> dict[str, dict[str, int]]:
    return {split: dataset.class_counts(split) for split in ("train", "val", "test") if dataset.subset(split)}


def _by_key(paths: Sequence[Path], keys: Sequence[bytes | None]) -> dict[Path, bytes | None]:
    return dict(zip(paths, keys))


def skipped_findings(skipped: Sequence[tuple[Path, str]]) -> list[Finding]:
    """What the scan left out: an image name it could not use blocks, any other file is only noted."""
    return [Finding("unreadable" if is_image_path(p) else "not_an_image", ERROR if is_image_path(p) else WARNING,
                    reason, (p,)) for p, reason in skipped]


def duplicate_findings(dataset: Dataset, keys: Sequence[bytes | None]) -> list[Finding]:
    """Files with equal content: under two labels (conflict), across splits (leakage), or merely repeated."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if key is not None:
            groups[key].append(i)
    out = []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        members = [dataset.samples[i] for i in rows]
        files = tuple(s.path for s in members)
        labels = sorted({dataset.classes[s.label] for s in members})
        splits = sorted({s.split for s in members})
        if len(labels) > 1:
            out.append(Finding("conflicting_labels", ERROR, f"the same image is labelled {', '.join(labels)}", files))
        if len(splits) > 1:
            out.append(Finding("leakage", ERROR, f"the same image is in {' and '.join(splits)}", files))
        if len(labels) == 1 and len(splits) == 1:
            out.append(Finding("duplicate", WARNING, f"{len(files)} identical files", files))
    return out


def imbalance_findings(dataset: Dataset) -> list[Finding]:
    counts = dataset.class_counts()
    if len(counts) < 2 or min(counts.values()) == 0:
        return []
    largest, smallest = max(counts.values()), min(counts.values())
    if largest / smallest < IMBALANCE_RATIO:
        return []
    small = [c for c, n in counts.items() if n * IMBALANCE_RATIO <= largest]
    folders = tuple(sorted({_class_folder(s.path, dataset.classes[s.label]) for s in dataset.samples
                            if dataset.classes[s.label] in small}))
    shown = ", ".join(f"{c} {counts[c]}" for c in small)
    return [Finding("imbalance", WARNING, f"classes with a third or less of the largest ({largest}): {shown}; "
                    "consider --balance or more photos of them", folders, largest / smallest)]


def _class_folder(path: Path, cls: str) -> Path:
    for parent in path.parents:
        if parent.name == cls:
            return parent
    return path.parent


def image_findings(facts: Sequence[ImageFacts]) -> list[Finding]:
    out = []
    for f in facts:
        short, long = min(f.size), max(f.size)
        if short < TINY_SIDE:
            out.append(Finding("tiny", WARNING, f"{f.size[0]}x{f.size[1]} px", (f.path,)))
        if short and long / short > EXTREME_ASPECT:
            out.append(Finding("extreme_aspect", WARNING, f"{f.size[0]}x{f.size[1]} px: the centre crop keeps "
                               f"{short / long:.0%} of it", (f.path,), long / short))
        if f.grey_std < LOW_INFO_STD:
            out.append(Finding("low_information", WARNING, f"nearly uniform (grey-level spread {f.grey_std:.1f})",
                               (f.path,), f.grey_std))
        wanted = _FORMATS_OF.get(f.path.suffix.lower())
        if wanted and f.format and f.format not in wanted:
            out.append(Finding("wrong_format", WARNING, f"named {f.path.suffix} but holds {f.format} data",
                               (f.path,)))
    return out


def mode_findings(dataset: Dataset, facts: Sequence[ImageFacts]) -> list[Finding]:
    """Colour modes other than the commonest: grey or alpha images confined to one class are a shortcut the
    head can learn instead of the content."""
    modes = Counter(f.mode for f in facts)
    if len(modes) < 2:
        return []
    common = modes.most_common(1)[0][0]
    label_of = {s.path: dataset.classes[s.label] for s in dataset.samples}
    out = []
    for mode in sorted(m for m in modes if m != common):
        files = tuple(f.path for f in facts if f.mode == mode)
        classes = sorted({label_of[p] for p in files})
        where = f"all in class {classes[0]}" if len(classes) == 1 else f"in {len(classes)} classes"
        out.append(Finding("mixed_modes", WARNING, f"{len(files)} {mode} images among {modes[common]} {common} "
                           f"({where})", files))
    return out


def near_duplicate_findings(paths: Sequence[Path], features: np.ndarray, splits: np.ndarray,
                            keys: dict[Path, bytes | None], threshold: float = NEAR_DUPLICATE_COSINE,
                            chunk: int = 2048) -> list[Finding]:
    """Groups of distinct files whose features' cosine similarity reaches `threshold` (exact duplicates are
    `duplicate_findings`'); across splits they leak."""
    unit = np.asarray(features, np.float32) - np.asarray(features, np.float32).mean(0)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[int, float] = {}  # each paired row's highest similarity to another
    for start in range(0, len(paths), chunk):
        sims = unit[start:start + chunk] @ unit[start:].T  # each pair once: columns from the chunk's first row on
        rows, cols = np.nonzero(sims >= threshold)
        for r, col in zip(rows.tolist(), cols.tolist()):
            i, c = start + r, start + col
            if c <= i or (keys.get(paths[i]) is not None and keys.get(paths[i]) == keys.get(paths[c])):
                continue
            parent[root(i)] = root(c)
            for j in (i, c):
                best[j] = max(best.get(j, 0.0), float(sims[r, col]))
    groups: dict[int, list[int]] = defaultdict(list)
    for i in best:
        groups[root(i)].append(i)
    out = []
    for rows in groups.values():
        rows = sorted(rows)
        score = max(best.get(i, 0.0) for i in rows)
        in_splits = sorted({str(splits[i]) for i in rows})
        kind, what = ("near_duplicate_leakage", f" across {' and '.join(in_splits)}") if len(in_splits) > 1 \
            else ("near_duplicate", "")
        out.append(Finding(kind, WARNING, f"{len(rows)} near-identical images{what} (cosine {score:.3f})",
                           tuple(paths[i] for i in rows), score))
    return out


def label_findings(feats, classes: Sequence[str]) -> list[Finding]:
    from headstart.evaluate.labels import find_label_errors

    issues = find_label_errors(feats.features, feats.labels, feats.paths, classes)
    return [Finding("label_error", WARNING, f"labelled {i.given} ({i.given_probability:.0%}), looks like "
                    f"{i.suggested} ({i.suggested_probability:.0%})", (i.path,), i.given_probability)
            for i in issues]


def _features(dataset: Dataset, keys: Sequence[bytes | None], backbone: str, weights: Path | None, device: str,
              deep: bool, progress, notes: list[str], engine: str = "auto"):
    """The dataset's features when cached (or, `deep`, extracted now), else None with a note saying why."""
    from headstart.cache.dataset import dataset_features
    from headstart.cache.features import FeatureCache
    from headstart.errors import WeightsError
    from headstart.runtime.frozen import FrozenBackbone

    try:
        # The engine resolved as `train` resolves it: `auto` is int8 on a VNNI CPU, whose features are cached
        # apart from float32's (check once looked for float32's after an int8 train and found none).
        frozen = FrozenBackbone.pretrained(sized_spec(backbone, dataset), weights).with_engine(engine, device)
    except WeightsError as exc:
        if deep:
            raise
        notes.append(f"near-duplicates and label errors not looked for: {exc}")
        return None
    if not deep:
        index, _ = FeatureCache(frozen, engine_kind=frozen.engine_kind(device)).index()
        if not all(k in index for k in keys if k is not None):
            notes.append(f"near-duplicates and label errors not looked for: {backbone}'s features are not cached "
                         "(run `headstart train` first, or check --deep to extract them now)")
            return None
    if len(dataset.samples) < 2:
        return None
    return dataset_features(dataset, frozen, device, progress)


def sized_spec(backbone: str, dataset: Dataset):
    """The backbone as `train` with the head strategy runs it on these photos (a native view for small ones), so
    that the features `train` cached are the ones found."""
    from headstart.backbones.registry import resolve
    from headstart.train.pipeline import sized_for_photos

    return sized_for_photos(resolve(backbone), dataset, native_view=True, fine_tuning=False)
