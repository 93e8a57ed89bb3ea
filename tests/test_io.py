"""robustfl.io: atomic writes never leave a partial file, write errors name the path, checkpoints are
loaded without unpickling code and a corrupt one is a clear ValueError (README "Guarantees")."""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from robustfl import io as rio
from robustfl.data import partition as part


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------ atomic_open
def test_atomic_open_writes_the_whole_file_and_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.csv"  # the parent is created
    with rio.atomic_open(target) as fh:
        fh.write("a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    assert _leftovers(target.parent) == []


def test_atomic_open_exception_leaves_no_temp_and_no_target(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError, match="boom"), rio.atomic_open(target) as fh:
        fh.write("half a file")
        raise RuntimeError("boom")
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_atomic_open_exception_keeps_the_previous_content(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old complete content\n")
    with pytest.raises(KeyboardInterrupt), rio.atomic_open(target) as fh:  # BaseException too
        fh.write("new partial")
        raise KeyboardInterrupt
    assert target.read_text() == "old complete content\n"
    assert _leftovers(tmp_path) == []


def test_unwritable_output_directory_is_a_clear_oserror(tmp_path):
    """The parent 'directory' is a regular file (chmod does not stop root, a file in the path does)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("I am a file")
    target = blocker / "out.csv"
    with pytest.raises(OSError) as ei:
        rio.atomic_write_text(target, "x")
    assert str(target) in str(ei.value)
    assert blocker.read_text() == "I am a file"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_full_disk_is_a_clear_oserror_and_no_partial_file(tmp_path, monkeypatch, where):
    target = tmp_path / "rounds.csv"
    target.write_text("previous\n")

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "fsync":
        monkeypatch.setattr(rio.os, "fsync", enospc)
    elif where == "replace":
        monkeypatch.setattr(rio.os, "replace", enospc)

    with pytest.raises(OSError) as ei, rio.atomic_open(target) as fh:
        fh.write("new content\n")
        if where == "write":  # what a write on a full disk raises inside the caller's block
            enospc()
    assert ei.value.errno == errno.ENOSPC
    assert str(target) in str(ei.value) and "No space left" in str(ei.value)
    assert target.read_text() == "previous\n"  # untouched
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_unserialisable_leaves_nothing(tmp_path):
    target = tmp_path / "run.json"
    with pytest.raises(TypeError):
        rio.atomic_write_json(target, {"x": object()})
    assert not target.exists() and _leftovers(tmp_path) == []
    rio.atomic_write_json(target, {"a": np.float32(1.5), "b": np.arange(2), "p": Path("x")})
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [0, 1], "p": "x"}


# ------------------------------------------------------------------------------------------ checkpoints
def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"round": 2, "theta": torch.randn(50, generator=g), "config_hash": "abc",
            "rng": {"gen": g.get_state(), "torch": torch.get_rng_state()},
            "rows": torch.zeros(2, 9, dtype=torch.float64)}


def test_checkpoint_round_trip(tmp_path):
    st = _state()
    p = rio.save_checkpoint(tmp_path / "c.pt", st)
    back = rio.load_checkpoint(p)
    assert set(back) == set(st)
    assert torch.equal(back["theta"], st["theta"]) and back["round"] == 2
    assert torch.equal(back["rng"]["gen"], st["rng"]["gen"])
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "not_a_state", "no_checksum", "tampered",
                                    "bitflip"])
def test_corrupt_checkpoint_is_a_valueerror_naming_the_file(tmp_path, damage):
    p = rio.save_checkpoint(tmp_path / "c.pt", _state())
    raw = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        p.write_bytes(b"")
    elif damage == "garbage":
        p.write_bytes(os.urandom(len(raw)))
    elif damage == "not_a_state":
        torch.save([1, 2, 3], p)
    elif damage == "no_checksum":  # e.g. written by atomic_save_torch / an older version
        rio.atomic_save_torch(p, _state())
    elif damage == "tampered":  # a valid torch file whose content changed after the checksum
        st = torch.load(p, weights_only=True)
        st["theta"][3] += 1.0
        torch.save(st, p)
    elif damage == "bitflip":  # one flipped bit inside theta's bytes: torch.load itself does not notice
        at = raw.find(_state()["theta"].numpy().tobytes())
        assert at > 0
        buf = bytearray(raw)
        buf[at + 17] ^= 0x04
        p.write_bytes(bytes(buf))
        assert not torch.equal(torch.load(p, weights_only=True)["theta"], _state()["theta"])  # silently wrong
    with pytest.raises(ValueError) as ei:
        rio.load_checkpoint(p)
    assert str(p) in str(ei.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_with_code_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"round": 1, "theta": _Evil()}, p)  # torch.save pickles the object
    raw_pickle = tmp_path / "evil_raw.pt"
    raw_pickle.write_bytes(pickle.dumps({"round": 1, "x": _Evil()}))
    for f in (p, raw_pickle):
        with pytest.raises(ValueError) as ei:
            rio.load_checkpoint(f)
        assert str(f) in str(ei.value)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_partition_with_pickled_objects_is_refused(tmp_path):
    """Partitions are read with np.load(allow_pickle=False): an object array (pickle) is an error."""
    parts = [np.arange(5), np.arange(5, 9)]
    base = tmp_path / "p"
    part.save_partition(base, parts, {"seed": 0})
    got, _ = part.load_partition(base)
    assert [list(g) for g in got] == [list(x) for x in parts]
    buf = io.BytesIO()
    np.savez(buf, indices=np.array([_Evil()], dtype=object), offsets=np.array([0, 1]))
    (tmp_path / "p.npz").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):
        part.load_partition(base)


def test_provenance_helpers():
    v = rio.versions()
    assert {"python", "torch", "numpy", "robustfl"} <= set(v)
    assert isinstance(rio.git_commit(), str) and rio.git_commit()
    assert rio.device_name(torch.device("cpu")).startswith("cpu")


def test_git_commit_override_wins_over_a_stale_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTFL_GIT_COMMIT", "abc123")
    assert rio.git_commit() == "abc123"
    monkeypatch.delenv("ROBUSTFL_GIT_COMMIT")
    assert rio.git_commit(tmp_path) == "unknown"  # not a git checkout, no override
