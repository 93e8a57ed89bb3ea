"""A run's checkpoints: its state after a round, written atomically (the previous one kept as
``.prev.pt``), restored only after validation, and removed once the run's outputs exist.

A state holds the round, the global model, every random stream (the run's generators, torch's global
and CUDA RNGs) and the metrics rows so far; it belongs to the configuration of :func:`config_hash`. A
killed run restarted with the same arguments resumes from the last good state and ends with the same
metrics (tests/test_resume.py).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from robustfl.config import RunConfig
from robustfl.io import load_checkpoint, save_checkpoint
from robustfl.reporting import results

log = logging.getLogger("robustfl")

ROUND_COLUMNS = [*results.ROUND_COLUMNS, *results.ROUND_OPTIONAL_COLUMNS]  # what a run writes
CLIENT_COLUMNS = [*results.CLIENT_COLUMNS, *results.CLIENT_OPTIONAL_COLUMNS]  # what a run writes
_INTS = {"round", "n_excluded", "client", "malicious", "detected", "selected"}


def config_hash(cfg: RunConfig) -> str:
    """The configuration a checkpoint belongs to (device and checkpoint_every aside); the engine mapping's
    keys as the flat fields they replaced, so that earlier checkpoints of the same run still match."""
    d = cfg.to_dict()
    d.pop("device", None)
    d.pop("checkpoint_every", None)
    eng = d.pop("engine")
    d.update(engine=eng["kind"], conv=eng["conv"], cuda_graph=eng["cuda_graph"])
    return hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()[:16]


def rng_state(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, torch.Tensor]:
    """The states of the run's ``generators`` (by name), torch's global RNG and, on CUDA, the device's."""
    st = {name: g.get_state() for name, g in generators.items()}
    st["torch"] = torch.get_rng_state()
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, torch.Tensor], generators: dict[str, torch.Generator], device: torch.device) -> None:
    for name, g in generators.items():
        g.set_state(st[name])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _widths(required: tuple[str, ...], optional: tuple[str, ...]) -> tuple[int, ...]:
    """Row widths a checkpoint may hold: every column first, then those of older versions (optional
    columns are appended in the order they were introduced, so an older row is a prefix)."""
    return tuple(len(required) + k for k in range(len(optional), -1, -1))


def tensors_to(obj: Any, device: torch.device | str) -> Any:
    """A nested dict/list of tensors with every tensor on ``device`` (saved on the CPU, restored on the
    run's device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: tensors_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors_to(v, device) for v in obj)
    return obj


def _rows_to_tensor(rows: list[dict[str, Any]], cols: list[str]) -> torch.Tensor:
    return torch.tensor([[float(r[c]) for c in cols] for r in rows], dtype=torch.float64)


def _rows_from_tensor(t: torch.Tensor, cols: list[str]) -> list[dict[str, Any]]:
    pad = [math.nan] * (len(cols) - t.shape[1])  # optional columns a legacy checkpoint lacks (NaN)
    return [{c: (int(v) if c in _INTS and not math.isnan(v) else float(v)) for c, v in zip(cols, r.tolist() + pad)}
            for r in t]


@dataclass
class RunState:
    """What a checkpoint restores: the rounds done, the global model, the random streams, the rows."""

    round: int
    theta: torch.Tensor
    rng: dict[str, torch.Tensor]
    rows: list[dict[str, Any]]
    client_rows: list[dict[str, Any]]
    defense_state: dict[str, Any] = field(default_factory=dict)  # ServerContext.state across rounds


class Checkpoints:
    """The checkpoints of one run at ``path`` (None: none), for its configuration ``cfg``."""

    def __init__(self, path: Path | None, cfg: RunConfig) -> None:
        self.path = None if path is None else Path(path)
        self.cfg = cfg
        self.chash = config_hash(cfg)

    @property
    def prev(self) -> Path:
        return self.path.with_suffix(".prev.pt")

    def save(self, state: RunState) -> None:
        """Write ``state`` atomically, the latest checkpoint becoming the previous one."""
        if self.path.exists():
            self.path.replace(self.prev)
        save_checkpoint(self.path, {"round": state.round, "theta": state.theta.cpu(), "config_hash": self.chash,
                                    "rng": state.rng, "rows": _rows_to_tensor(state.rows, ROUND_COLUMNS),
                                    "client_rows": _rows_to_tensor(state.client_rows, CLIENT_COLUMNS),
                                    "defense_state": tensors_to(state.defense_state, "cpu")})

    def restore(self, theta: torch.Tensor, rng: dict[str, torch.Tensor]) -> RunState | None:
        """The last good state: the latest, else the previous one; a corrupt, foreign (another
        configuration) or mismatched one (:meth:`validate` against the run's ``theta`` and ``rng``) is
        skipped with a logged warning, and with none usable None (the run starts from round 1). Never a
        state it has not verified."""
        if self.path is None or not (self.path.exists() or self.prev.exists()):
            return None
        for path in (self.path, self.prev):
            if not path.exists():
                continue
            try:
                st = load_checkpoint(path)
                if st.get("config_hash") != self.chash:
                    log.warning("checkpoint %s belongs to another configuration; ignored", path)
                    continue
                self.validate(st, path, theta, rng)
            except ValueError as exc:
                log.warning("%s; %s", exc, "trying the previous checkpoint" if path == self.path else "ignored")
                if path == self.path:
                    # drop it, so that the next checkpoint does not rotate it onto the good previous one
                    self.path.unlink(missing_ok=True)
                continue
            log.info("resumed from checkpoint %s after round %d", path, int(st["round"]))
            return RunState(int(st["round"]), st["theta"], st["rng"], _rows_from_tensor(st["rows"], ROUND_COLUMNS),
                            _rows_from_tensor(st["client_rows"], CLIENT_COLUMNS), st.get("defense_state", {}))
        log.warning("no usable checkpoint; starting from round 1")
        return None

    def validate(self, st: dict[str, Any], path: Path, theta: torch.Tensor, rng: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming ``path`` unless ``st`` is a state of this run's shapes: its global model
        like ``theta`` and finite, a round of the run, rows for its rounds and clients, RNG states like
        ``rng``."""
        def bad(msg: str) -> None:
            raise ValueError(f"checkpoint {path} does not match this run: {msg}")

        missing = sorted({"round", "theta", "rng", "rows", "client_rows"} - set(st))
        if missing:
            bad(f"missing {missing}")
        rnd = st["round"]
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= self.cfg.rounds:
            bad(f"round {rnd!r} is not in 1..{self.cfg.rounds}")
        th = st["theta"]
        if not isinstance(th, torch.Tensor) or tuple(th.shape) != tuple(theta.shape) or th.dtype != theta.dtype:
            bad(f"global model {getattr(th, 'dtype', type(th))} {tuple(getattr(th, 'shape', ()))}, expected "
                f"{theta.dtype} {tuple(theta.shape)} (another model?)")
        if not bool(torch.isfinite(th).all()):
            bad("the global model is not finite")
        for key, widths, n_rows in (("rows", _widths(results.ROUND_COLUMNS, results.ROUND_OPTIONAL_COLUMNS), rnd),
                                    ("client_rows", _widths(results.CLIENT_COLUMNS, results.CLIENT_OPTIONAL_COLUMNS),
                                     rnd * self.cfg.n_clients)):
            t = st[key]  # rows without some optional columns: a checkpoint of an older version
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or (tuple(t.shape) not in
                                                                    {(n_rows, w) for w in widths}):
                bad(f"{key} has shape {tuple(getattr(t, 'shape', ()))}, expected {(n_rows, widths[0])}")
        got = st["rng"]
        if not isinstance(got, dict) or any(
                not isinstance(got.get(k), torch.Tensor) or got[k].dtype != v.dtype or got[k].shape != v.shape
                for k, v in rng.items() if k != "cuda"):
            bad("RNG states of the wrong kind or size")

    def remove(self) -> None:
        if self.path is not None:
            remove_checkpoints(self.path)


def remove_checkpoints(ckpt_path: Path) -> None:
    """Delete a run's checkpoint, its previous one and temporary files a killed checkpoint write left."""
    ckpt_path = Path(ckpt_path)
    prev = ckpt_path.with_suffix(".prev.pt")
    for p in (ckpt_path, prev):
        p.unlink(missing_ok=True)
    if ckpt_path.parent.is_dir():
        for p in (ckpt_path, prev):
            for tmp in ckpt_path.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
                tmp.unlink(missing_ok=True)
