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

A full disk: every write that can fill one goes through `atomic_path`, `disk_space` or `allocate`, which turn
ENOSPC (and a quota or file-size limit) into one `UserError` line naming the folder, what was already there
untouched. Memory-mapped files are allocated up front (`allocate`): a write into a sparse mapping on a full disk
is a SIGBUS that kills the process, with no message at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from headstart.errors import UserError

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
        with disk_space(self.target):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = _new_file_beside(self.target)
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tmp, self.tmp = self.tmp, None
        if exc_type is not None:  # the writer failed: the target keeps its old content
            tmp.unlink(missing_ok=True)
            if (full := disk_full_error(exc, self.target)) is not None:
                raise full from exc
            return
        try:
            if os.path.abspath(self.target.parent) != os.path.abspath(tmp.parent):  # elsewhere, a rename may cross
                # file systems: not atomic
                raise ValueError(f"{self.target}: an atomic write stays in the folder it started in")
            ordinary_mode(tmp)  # a writer that replaced the file (safetensors does) made it 0600
            os.replace(tmp, self.target)
        except BaseException as failure:
            tmp.unlink(missing_ok=True)
            if (full := disk_full_error(failure, self.target)) is not None:
                raise full from failure
            raise


def umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc/self/status): setting and
    restoring it, the only portable way, races with threads creating files meanwhile."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: Path) -> None:
    """Give the file at `path` the permissions an ordinary write gets under the user's umask (0644 under 022)."""
    os.chmod(path, 0o666 & ~umask())


def _new_file_beside(target: Path) -> Path:
    """A new, empty, uniquely named file in `target`'s folder, named relative to that folder as `target` is (so
    that a relative target gets a relative temporary path). Created with mode 0o666 and left to the umask, as an
    ordinary write is: `tempfile.mkstemp` makes 0600 files, which a teammate or a service account sharing the
    model or the cache could not read."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(target.parent))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`): readers never see a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# What a write that ran out of room fails with, and how the message says it.
_FULL_DISK = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _errno_of(exc: BaseException | None) -> int | None:
    """The errno of a failed write: an OSError's, or one a library wrapped in its own type, as the cause or in
    the message (safetensors, written in Rust, says "... No space left on device (os error 28)")."""
    for _ in range(4):  # a short chain of causes, never a loop
        if exc is None:
            return None
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        if (found := _RUST_OS_ERROR.search(str(exc))) is not None:
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def short_of_room(path: Path) -> UserError | None:
    """`disk_full_error`'s line when the disk that would hold `path` has (nearly) no room left, else None: for
    failures a library reports in words of its own, which must not be taken for another problem."""
    folder = Path(path).parent
    return disk_full_error(OSError(errno.ENOSPC, "no space left"), path) if _nearly_full(folder) else None


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free < (1 << 20)
    except (OSError, StopIteration):
        return False


def disk_full_error(exc: BaseException | None, path: Path) -> UserError | None:
    """The one-line error for a write to `path` that failed for want of room, or None when `exc` is another
    failure. Inside the cache the way out is another cache folder; elsewhere (a model's --out), another folder."""
    folder = Path(path).parent
    code = None if isinstance(exc, UserError) else _errno_of(exc)
    if code is None and isinstance(exc, OSError) and _nearly_full(folder):
        code = errno.ENOSPC  # a short write reported without an errno (numpy's "4800 requested and 4064 written")
    if code not in _FULL_DISK:
        return None
    try:
        in_cache = Path(os.path.abspath(folder)).is_relative_to(os.path.abspath(cache_root()))
    except (OSError, ValueError):
        in_cache = False
    way_out = ("set HEADSTART_CACHE to a folder on a disk with room" if in_cache
               else "choose a folder on a disk with room")
    return UserError(f"{_FULL_DISK[code]} on the device holding {folder} (writing {Path(path).name}): "
                     f"free some space there or {way_out}")


@contextlib.contextmanager
def disk_space(path: Path) -> Iterator[None]:
    """Inside the block, a write to (or beside) `path` that runs out of room raises `disk_full_error`'s one line."""
    try:
        yield
    except Exception as exc:  # not only OSError: libraries wrap it (see `_errno_of`)
        if (full := disk_full_error(exc, path)) is not None:
            raise full from exc
        raise


def allocate(fd: int, size: int, path: Path) -> None:
    """Reserve `size` bytes of the file open as `fd` (written to `path`) before it is memory-mapped: a sparse
    mapping fails on a full disk only when a page is written, by SIGBUS. Where the file system cannot allocate
    (EOPNOTSUPP, EINVAL), the file stays sparse, as before."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    with disk_space(path):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise


def file_sha256(path: Path) -> str:
    """Hex digest of a file's content, read in chunks so large weight files never sit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
