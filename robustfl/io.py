"""Atomic file output, checkpoints and provenance.

Every result file is written to a temporary file in the same directory and moved into place with
``os.replace`` (atomic on POSIX), so an interrupted job never leaves a half-written file that
Snakemake would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: results/tables/figures write through here
    import torch


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` (text modes in UTF-8); on success fsync and rename it onto ``path``.

    On any error (including in the caller's block) the temporary file is removed and ``path`` is left as
    it was (absent, or its previous complete content). An ``OSError`` (full disk, unwritable or missing
    directory, ...) is re-raised as an ``OSError`` of the same errno whose message names ``path``."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        named = _naming(exc, path)
        if named is exc:
            raise
        raise named from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _naming(exc: OSError, path: Path) -> OSError:
    """An OSError like ``exc`` (same errno, hence the same subclass) whose message names ``path``."""
    if str(path) in str(exc):
        return exc
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        what += f" ({exc.filename})"
    msg = f"cannot write {path}: {what}"
    return OSError(exc.errno, msg) if exc.errno is not None else OSError(msg)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (power loss); best effort, some filesystems cannot fsync a directory."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays of any size (``item`` fails for size != 1)
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` through a temporary file (no checksum: use :func:`save_checkpoint` for run states)."""
    import torch

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


#: key of the content checksum stored in every checkpoint written by :func:`save_checkpoint`
CHECKSUM_KEY = "sha256"


def state_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content (tensors by dtype, shape and bytes; dict keys sorted).

    ``torch.load`` does not verify the CRCs of its zip container, so a flipped bit in a tensor would
    load silently; this digest, stored in the checkpoint and checked on load, catches it."""
    import torch

    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(f"D|{len(o)}|".encode())
            for k in sorted(o, key=repr):
                feed(k)
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L|{len(o)}|".encode())
            for v in o:
                feed(v)
        elif o is None or isinstance(o, (bool, int, float, str)):
            h.update(f"S|{type(o).__name__}|{o!r}|".encode())
        else:
            raise TypeError(f"cannot checksum a {type(o).__name__} in a checkpoint")

    feed(obj)
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a run state atomically with its content checksum; read it back with :func:`load_checkpoint`."""
    state = {k: v for k, v in state.items() if k != CHECKSUM_KEY}
    state[CHECKSUM_KEY] = state_digest(state)
    return atomic_save_torch(path, state)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no code is ever unpickled) and verify its checksum.

    Raises ``ValueError`` naming the file if it is corrupt, truncated, not a robustfl run state, holds
    anything but tensors and plain values, or its content does not match its checksum."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt (or hostile) file
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or "round" not in obj:
        raise ValueError(f"checkpoint {path} does not hold a robustfl run state")
    stored = obj.pop(CHECKSUM_KEY, None)
    if not isinstance(stored, str):
        raise ValueError(f"checkpoint {path} has no content checksum (not written by save_checkpoint)")
    try:
        actual = state_digest(obj)
    except TypeError as exc:
        raise ValueError(f"checkpoint {path} holds unexpected content ({exc})") from exc
    if actual != stored:
        raise ValueError(f"checkpoint {path} is corrupt: its content does not match its checksum")
    return obj


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit the code was taken from: ``$ROBUSTFL_GIT_COMMIT`` when set (a copy of a checkout whose
    ``.git`` is stale or absent, e.g. on a remote GPU machine), else ``git rev-parse HEAD`` (with
    '+dirty' if tracked files changed), else 'unknown'."""
    if os.environ.get("ROBUSTFL_GIT_COMMIT"):
        return os.environ["ROBUSTFL_GIT_COMMIT"]
    cwd = cwd or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the packages that determine results."""
    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    # from the installed metadata (no build tag such as +cu130; torch's CUDA is under "cuda"): importing
    # torchvision, scikit-learn, scipy or snakemake only to read a version string costs seconds per run job
    for mod, dist in (("torchvision", "torchvision"), ("triton", "triton"), ("scipy", "scipy"), ("sklearn", "scikit-learn"),
                      ("pandas", "pandas"), ("snakemake", "snakemake")):
        with contextlib.suppress(Exception):
            out[mod] = importlib.metadata.version(dist)
    out["cuda"] = torch.version.cuda or "none"
    from robustfl import __version__

    out["robustfl"] = __version__
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
