"""Where headstart keeps what it computes once (converted weights, exported backbones, feature caches, fine-tuning
boundary stores), how each entry there is named, and the one way files are written there.

Content-keyed entries: an entry's name is `store_key(kind, parts)`, a hash of everything its content depends on
plus the version of that kind of entry, from the one table `VERSIONS`. The table and the key live here, at the
bottom of the package, rather than in `cache/`, because both layers name entries: `runtime.export` names the
ONNX exports that `runtime.frozen` runs, `cache.features` and `cache.boundary` name their folders, and `runtime/`
must not import `cache/` (dependencies point down: cache -> runtime -> backbones -> vision/data).

Atomic writes: `atomic_path` gives a writer a temporary path beside the target and renames it into place only
when the writer finished; readers see the old file or the new one, never half of one, and a failure (a
KeyboardInterrupt included) leaves no temporary file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

# The version of each kind of entry, part of its every key: bump one when what is stored for the same parts
# changes, so that entries written before are no longer found (they are then recomputed, never misread).
VERSIONS: dict[str, int] = {
    "features": 2,  # frozen-backbone features (cache.features); 2: multi-scale pooled features
    "boundary": 2,  # activations at the fine-tuning freeze boundary (cache.boundary)
    "export": 3,  # ONNX exports of a backbone or its frozen bottom (runtime.export); bump with the export recipe
}
_FOLDERS = {"features": "features", "boundary": "boundary", "export": "onnx"}  # each kind's folder in cache_root()
# The name a kind's version has among the hashed parts. Feature caches and boundary stores were hashed with these
# names before the table existed; keeping them keeps the caches already on users' disks valid.
_VERSION_FIELDS = {"features": "v", "boundary": "store_version", "export": "v"}
KEY_CHARS = 20  # hex characters of sha256 in a key: 80 bits, ample for the entries of one cache


def cache_root() -> Path:
    """$HEADSTART_CACHE, else the platform's user cache dir (honours XDG_CACHE_HOME)."""
    override = os.environ.get("HEADSTART_CACHE")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("headstart", appauthor=False))


def store_key(kind: str, parts: Mapping[str, object]) -> str:
    """The content key of an entry of `kind` (a key of `VERSIONS`): a hash of `parts` (JSON-able values; others
    are hashed by their str) together with the kind's version. Equal parts give equal keys in every process."""
    field = _VERSION_FIELDS[kind]
    if field in parts:
        raise ValueError(f"'{field}' is the version of a {kind} entry, not a part the caller may set")
    desc = {**parts, field: VERSIONS[kind]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:KEY_CHARS]


def store_path(
    kind: str, parts: Mapping[str, object], *, label: str = "", suffix: str = "", root: Path | None = None
) -> Path:
    """Where the entry keyed by (`kind`, `parts`) lives: `<root>/<label>-<key><suffix>`, `root` defaulting to the
    kind's folder in `cache_root()`. `label` only makes names readable; the key alone identifies the entry."""
    name = f"{label}-{store_key(kind, parts)}" if label else store_key(kind, parts)
    return (root or cache_root() / _FOLDERS[kind]) / f"{name}{suffix}"


class atomic_path:
    """`with atomic_path(target) as tmp:` write the file at `tmp`; when the block finishes, `tmp` is renamed onto
    `target`, and when it raises (BaseException too) `tmp` is removed and `target` is left as it was.

    The parent folder is created. `tmp` is unique and beside `target`, on the same file system, so the rename is
    atomic. A writer whose file is named by its content may set `.target` to another name in the same folder
    inside the block."""

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tmp, self.tmp = self.tmp, None
        if exc_type is not None:  # the writer failed: the target keeps its old content
            tmp.unlink(missing_ok=True)
            return
        try:
            if self.target.parent != tmp.parent:  # elsewhere, a rename may cross file systems: not atomic
                raise ValueError(f"{self.target}: an atomic write stays in the folder it started in")
            os.replace(tmp, self.target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`): readers never see a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_sha256(path: Path) -> str:
    """Hex digest of a file's content, read in chunks so large weight files never sit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
