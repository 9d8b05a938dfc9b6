"""bench/peers.py without installing anything: the acceptance split, the --limit subset, the process-tree
measurement, the venv pin check and the table, on tiny generated folders."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCEPTANCE = ROOT.parent / "shared" / "tools" / "acceptance.sh"


def _load():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


peers = _load()

# Names whose order differs between byte order and a natural or case-folding sort, plus entries split80 skips.
NAMES = ["b.jpg", "B.jpg", "_x.jpg", "10.jpg", "9.jpg", "a b.jpg", "Ä.jpg", "z.jpg", "a.jpg", "0.jpg", "c.JPG", "-d.jpg"]


def _photos(root: Path, per_class: dict[str, list[str]]) -> Path:
    for cls, names in per_class.items():
        (root / cls).mkdir(parents=True)
        for n in names:
            (root / cls / n).write_bytes(b"x")
        (root / cls / ".hidden.jpg").write_bytes(b"x")
    (root / ".DS_Store").write_bytes(b"x")
    (root / ".cache").mkdir()
    return root


def _listing(root: Path) -> list[tuple[str, str]]:
    return sorted((str(p.relative_to(root)), os.readlink(p)) for p in root.rglob("*") if p.is_symlink())


def test_split80_puts_every_fifth_file_in_byte_order_to_val(tmp_path):
    src = _photos(tmp_path / "src", {"ants": NAMES, "bees": NAMES[:3]})
    peers.split80(src, tmp_path / "out")
    ordered = sorted(NAMES, key=lambda n: n.encode())
    val = sorted(p.name for p in (tmp_path / "out" / "val" / "ants").iterdir())
    assert val == sorted([ordered[4], ordered[9]])
    assert len(list((tmp_path / "out" / "train" / "ants").iterdir())) == len(NAMES) - 2
    assert (tmp_path / "out" / "val" / "bees").is_dir() and not any((tmp_path / "out" / "val" / "bees").iterdir())
    assert not any(".hidden" in name for name, _ in _listing(tmp_path / "out"))


@pytest.mark.skipif(not ACCEPTANCE.exists(), reason="no shared/tools/acceptance.sh beside the repository")
def test_split80_is_the_acceptance_checks_split(tmp_path):
    src = _photos(tmp_path / "src", {"ants": NAMES, "bees": NAMES[3:], "c d": NAMES[:6]})
    text = ACCEPTANCE.read_text()
    function = text[text.index("split80() {"):text.index("\n}\n", text.index("split80() {")) + 3]
    subprocess.run(["bash", "-c", f"{function}\nsplit80 \"$1\" \"$2\"", "split80", str(src), str(tmp_path / "sh")],
                   check=True, env={**os.environ, "LC_ALL": "C"})
    peers.split80(src, tmp_path / "py")
    assert _listing(tmp_path / "py") == _listing(tmp_path / "sh")
    assert len(_listing(tmp_path / "py")) == len(NAMES) * 2 - 3 + 6


def test_limit_keeps_the_first_files_of_each_class_in_each_split(tmp_path):
    root = tmp_path / "set"
    _photos(root / "train", {"ants": NAMES, "bees": NAMES[:2]})
    _photos(root / "val", {"ants": NAMES[:5], "bees": NAMES})
    small = peers.limited(peers.Split("set", root), tmp_path / "small", 3)
    assert small.train == tmp_path / "small" / "train"
    first3 = sorted(NAMES, key=lambda n: n.encode())[:3]
    assert sorted(p.name for p in (small.train / "ants").iterdir()) == sorted(first3)
    assert peers.count_images(small.train) == 3 + 2
    assert peers.count_images(small.val) == 3 + 3
    assert all((small.val / "bees" / n).resolve() == (root / "val" / "bees" / n).resolve() for n in first3)


def test_measure_counts_the_whole_process_tree(tmp_path):
    # The parent sleeps while a forked child holds 200 MiB: the largest-process RSS and the tree PSS both see it,
    # and the CPU the child burns is counted once it is waited for.
    code = ("import os, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    block = bytearray(200 * 2**20)\n"
            "    t = time.process_time()\n"
            "    while time.process_time() - t < 0.3: pass\n"
            "    time.sleep(1.5)\n"
            "    os._exit(0)\n"
            "os.waitpid(pid, 0)\n")
    usage = peers.measure([sys.executable, "-c", code], dict(os.environ), tmp_path / "log")
    assert usage.tree_pss_mib >= 190
    assert usage.peak_rss_mib >= 190
    assert usage.cpu_s >= 0.25
    assert usage.wall_s >= 1.5


def test_measure_exits_with_the_log_tail_when_the_command_fails(tmp_path):
    with pytest.raises(SystemExit, match="boom"):
        peers.measure([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], dict(os.environ),
                      tmp_path / "log")


def test_venv_matches_checks_every_pin():
    installed = f"pytest=={pytest.__version__}"
    assert peers.venv_matches(Path(sys.executable), [installed])
    assert not peers.venv_matches(Path(sys.executable), [installed, "pytest==0.0.1"])
    assert not peers.venv_matches(Path(sys.executable), ["no-such-package-here==1.0"])
    assert not peers.venv_matches(Path("/nonexistent/bin/python"), [installed])


def test_table_lines_up_every_row():
    usage = peers.Usage(wall_s=134.4, cpu_s=250.2, peak_rss_mib=4096.0, tree_pss_mib=4500.6)
    rows = [peers.Row("fastai", "vision_learner", "hymenoptera", 245, 153, 0.92157, usage),
            peers.Row("headstart", "headstart train (defaults)", "flowers", 3453, 864, 0.8, usage)]
    lines = peers.table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split(" | ")[0].strip() == "tool"
    assert {line.index("|") for line in lines if "|" in line} == {lines[0].index("|")}
    assert "0.9216" in lines[2] and "245/153" in lines[2] and "4501" in lines[2] and "134" in lines[2]


def test_parse_refuses_unknown_sets_and_recipes():
    assert peers.parse(["--sets", "flowers", "--recipes", "fastai,finetune"]).recipes == ["fastai", "finetune"]
    for argv in (["--sets", "cifar"], ["--recipes", "keras"], ["--limit", "0"]):
        with pytest.raises(SystemExit):
            peers.parse(argv)


def test_same_weights_refuses_a_backbone_that_is_not_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    ref = {"conv.weight": torch.arange(6.0).reshape(2, 3), "bn.running_mean": torch.zeros(2),
           "classifier.weight": torch.ones(4, 2)}  # the classifier is in the file, never in fastai's body
    save_file(ref, str(tmp_path / "w.safetensors"))
    body = {k: v.clone() for k, v in ref.items() if not k.startswith("classifier")}
    assert peers.same_weights(body, str(tmp_path / "w.safetensors")) == 2
    body["conv.weight"][0, 0] += 1e-3
    with pytest.raises(SystemExit, match="1 of 2 tensors differ"):
        peers.same_weights(body, str(tmp_path / "w.safetensors"))
    with pytest.raises(SystemExit, match="1 of 2"):
        peers.same_weights({"conv.weight": ref["conv.weight"], "extra": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
