#!/usr/bin/env python3
"""Build the default `make demo` dataset: a small, real Fashion-MNIST subset.

The images come from Debian's `dataset-fashion-mnist` package, fetched with
`apt-get download` and unpacked with `dpkg-deb -x`, so no root and no network
beyond the Debian mirrors is needed. Output layout (what the CLI expects):

    OUT_DIR/train/<class>/*.png   first N images per class of the training set
    OUT_DIR/val/<class>/*.png     first M images per class of the test set

Usage: python scripts/fetch_demo_data.py OUT_DIR [--per-class N] [--test-per-class M]
"""
import argparse
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image

PACKAGE = "dataset-fashion-mnist"
# Label order is fixed by the Fashion-MNIST spec (label i -> CLASSES[i]).
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
MARKER = ".complete"
FALLBACK = "pass your own data with `make demo DATA=path/to/photos`"


def fail(reason: str) -> NoReturn:
    print(f"fetch_demo_data: {reason}; {FALLBACK}", file=sys.stderr)
    sys.exit(2)


def apt_download(dest: Path) -> Path:
    """Download the .deb into dest; refresh the package lists once if we may."""
    def attempt():
        # Output is captured: as root, apt warns about its _apt sandbox not
        # reaching a private temp dir, which is harmless noise here.
        return subprocess.run(["apt-get", "download", PACKAGE], cwd=dest,
                              capture_output=True, text=True)
    try:
        res = attempt()
        if res.returncode != 0 and os.geteuid() == 0:
            # A fresh container often has empty package lists; only root can fix that.
            subprocess.run(["apt-get", "update"], capture_output=True)
            res = attempt()
    except FileNotFoundError:
        fail("apt-get not found (this fetcher needs a Debian/Ubuntu system)")
    debs = list(dest.glob(f"{PACKAGE}_*.deb"))
    if res.returncode != 0 or not debs:
        last = (res.stderr.strip().splitlines() or ["unknown error"])[-1]
        fail(f"could not download {PACKAGE} with apt-get ({last})")
    return debs[0]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, then one uint32 per dim)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        sys.exit(f"fetch_demo_data: {path.name}: IDX magic {found}, expected {magic}")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_idx(root: Path, stem: str) -> Path:
    # Debian ships them gzipped under /usr/share/datasets/, but don't rely on
    # the exact path or compression staying the same across package versions.
    for name in (stem + ".gz", stem):
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    sys.exit(f"fetch_demo_data: {stem} not found inside {PACKAGE}")


def write_split(images, labels, per_class: int, out: Path) -> None:
    for label, name in enumerate(CLASSES):
        # First-n by position keeps the subset deterministic across runs.
        idx = np.flatnonzero(labels == label)[:per_class]
        if len(idx) < per_class:
            sys.exit(f"fetch_demo_data: only {len(idx)} '{name}' images, asked for {per_class}")
        folder = out / name
        folder.mkdir(parents=True)
        for i in idx:  # source index in the file name, so images are traceable
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--per-class", type=int, default=60, help="train images per class")
    ap.add_argument("--test-per-class", type=int, default=40, help="val images per class")
    args = ap.parse_args()
    out = args.out_dir.resolve()

    if (out / MARKER).exists():
        print(f"demo data already present in {out} ({(out / MARKER).read_text().strip()})")
        return
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty dir (e.g. made by make) is fine to replace
        else:
            # Our own runs never leave a partial OUT_DIR (see rename below), so
            # this is someone else's data: refuse rather than clobber it.
            sys.exit(f"fetch_demo_data: {out} exists but was not made by this script; "
                     "remove it or choose another path")

    # Turn SIGTERM into SystemExit so the `finally` below still removes staging.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to OUT_DIR (same filesystem) so the final rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="fmnist-deb-") as tmp:
            tmp = Path(tmp)
            deb = apt_download(tmp)
            deb_mb = deb.stat().st_size / 1e6
            unpacked = tmp / "root"
            # dpkg-deb -x only extracts files: no root, no package database.
            if subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)]).returncode:
                fail(f"dpkg-deb could not unpack {deb.name}")
            for split, prefix, n in (("train", "train", args.per_class),
                                     ("val", "t10k", args.test_per_class)):
                images = read_idx(find_idx(unpacked, f"{prefix}-images-idx3-ubyte"), 2051)
                labels = read_idx(find_idx(unpacked, f"{prefix}-labels-idx1-ubyte"), 2049)
                write_split(images, labels, n, staging / split)
        summary = f"train={args.per_class}/class val={args.test_per_class}/class"
        (staging / MARKER).write_text(summary + "\n")
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # no-op after a successful rename

    print(f"demo data ready in {out}: {len(CLASSES)} classes ({', '.join(CLASSES)}), "
          f"{summary}, from {PACKAGE} ({deb_mb:.1f} MB .deb) in {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    main()
