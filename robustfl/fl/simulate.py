"""The federated-learning loop (Section 3.1, Figure 2, Algorithm 1).

One round: distribute the global model theta -> benign clients train locally (all at once, see
:mod:`robustfl.engine.train`) -> the colluding attackers craft their updates with white-box knowledge of
the benign ones (Section 3.2) -> the server screens the updates, aggregates them with the defense
rule, and sets theta <- theta + aggregate (Eq. 6) -> metrics are logged.

The run state is checkpointed atomically every ``checkpoint_every`` rounds; a killed run restarted
with the same arguments resumes from the last checkpoint and ends with the same metrics.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from robustfl import engine
from robustfl.aggregation import aggregators as agg
from robustfl.reporting import results
from robustfl.attacks import ATTACKS, AttackContext, is_targeted
from robustfl.config import RunConfig
from robustfl.aggregation.defenses import DEFENSES, NEEDS_AUX, NEEDS_ROOT, ServerContext
from robustfl.io import atomic_open, atomic_write_json, load_checkpoint, save_checkpoint
from robustfl.fl.metrics import attack_diagnostics, attacker_summary, backdoor_metrics, detected
from robustfl.models import PLRModel
from robustfl.params import ParamSpec, load_flat_, model_to_flat
from robustfl.engine import BatchPlan

log = logging.getLogger("robustfl")

ROUND_COLUMNS = [*results.ROUND_COLUMNS, *results.ROUND_OPTIONAL_COLUMNS]  # what a run writes
CLIENT_COLUMNS = [*results.CLIENT_COLUMNS, *results.CLIENT_OPTIONAL_COLUMNS]  # what a run writes


@dataclass
class ServerSets:
    """Data held by the server or the attackers, all disjoint from the clients' shards."""

    aux_x: torch.Tensor | None = None  # FLARE auxiliary set D (m inputs), Section 5.2
    aux_y: torch.Tensor | None = None
    root_x: torch.Tensor | None = None  # FLTrust root set
    root_y: torch.Tensor | None = None
    bd_train_x: torch.Tensor | None = None  # backdoor inputs the attackers train on
    bd_train_y: torch.Tensor | None = None
    bd_eval_x: torch.Tensor | None = None  # targeted inputs on which ASR is measured
    bd_eval_y: torch.Tensor | None = None
    probe_x: torch.Tensor | None = None  # inputs whose PLRs are dumped for the figures
    probe_y: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunData:
    model: PLRModel
    x_train: torch.Tensor  # uint8 NHWC on the device
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    shards: list[torch.Tensor]  # client i's indices into x_train
    sets: ServerSets
    num_classes: int


_GPU_LOCK: Any = None


def claim_gpu(max_slots: int = 256) -> int:
    """Spread concurrent run jobs over the visible GPUs: each process takes the first free (slot, GPU)
    file lock in the order slot 0 of every GPU, slot 1 of every GPU, ... so that k jobs on g GPUs put
    ceil(k/g) jobs on each card (Snakemake ``--resources gpu=N`` decides how many jobs run at once).
    The lock is held for the life of the process. Returns the GPU index."""
    global _GPU_LOCK
    if _GPU_LOCK is not None:
        return _GPU_LOCK[1]
    import fcntl
    import os
    import tempfile

    n = torch.cuda.device_count()
    for slot in range(max_slots):
        for i in range(n):
            path = os.path.join(tempfile.gettempdir(), f"robustfl-gpu{i}-slot{slot}.lock")
            fh = open(path, "w")  # noqa: SIM115 - held for the life of the process
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            _GPU_LOCK = (fh, i)
            return i
    return 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> a claimed CUDA GPU if available else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config device {name!r} requested, but torch sees no CUDA GPU on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", claim_gpu())
    if dev.type == "cuda":  # kernels launched on the current device (Triton's) must find this run's tensors
        torch.cuda.set_device(dev)
    return dev


def malicious_clients(cfg: RunConfig) -> list[int]:
    """The attackers are the last ``n_attackers`` clients (as in the authors' code for backdoor attacks;
    the partition is a random permutation, so which indices are malicious does not matter)."""
    return list(range(cfg.n_clients - cfg.n_attackers, cfg.n_clients))


def screen_updates(updates: torch.Tensor, d: int) -> torch.Tensor:
    """Server-side screening (documented policy, README "Guarantees"): a wrong shape or dtype is an
    error; a client update holding NaN/Inf is excluded from the round with a logged warning.
    Returns the boolean mask of clients kept."""
    if updates.dim() != 2 or updates.shape[1] != d:
        raise ValueError(f"client updates have shape {tuple(updates.shape)}, expected (n, {d})")
    if not updates.is_floating_point():
        raise ValueError(f"client updates have dtype {updates.dtype}, expected a floating dtype")
    keep = torch.isfinite(updates).all(dim=1)
    if not bool(keep.all()):
        bad = (~keep).nonzero().flatten().tolist()
        log.warning("excluding client(s) %s: update holds NaN or Inf", bad)
    return keep


def _config_hash(cfg: RunConfig) -> str:
    """The configuration a checkpoint belongs to (device and checkpoint_every aside); the engine mapping's
    keys as the flat fields they replaced, so that earlier checkpoints of the same run still match."""
    d = cfg.to_dict()
    d.pop("device", None)
    d.pop("checkpoint_every", None)
    eng = d.pop("engine")
    d.update(engine=eng["kind"], conv=eng["conv"], cuda_graph=eng["cuda_graph"])
    return hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()[:16]


def _rng_state(g: torch.Generator, g_att: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    st = {"gen": g.get_state(), "gen_attack": g_att.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict[str, torch.Tensor], g: torch.Generator, g_att: torch.Generator, device: torch.device) -> None:
    g.set_state(st["gen"])
    g_att.set_state(st["gen_attack"])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


class Simulation:
    """The state of one cell's FL run, advanced one round at a time.

    :meth:`benign_plan` says which clients train from which model this round; the caller trains them
    (possibly packed with other cells' clients into one vectorised call) and hands the updates to
    :meth:`step`, which runs the attack, the server's screening and aggregation, and the evaluation.
    """

    def __init__(self, cfg: RunConfig, data: RunData, out_dir: Path, ckpt_path: Path | None = None,
                 device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.device = device = device or resolve_device(cfg.device)
        self.out_dir = Path(out_dir)
        self.ckpt_path = ckpt_path
        self.model = model = data.model.to(device)
        self.spec = ParamSpec(model)
        n = cfg.n_clients
        if len(data.shards) != n:
            raise ValueError(f"partition has {len(data.shards)} client shards, config n_clients = {n}")
        self.mal = malicious_clients(cfg)
        self.benign = [i for i in range(n) if i not in set(self.mal)]
        self.targeted = cfg.attack != "none" and is_targeted(cfg.attack)
        self.attack_fn = ATTACKS.get(cfg.attack) if cfg.attack != "none" else None
        self.defense_fn = DEFENSES.get(cfg.defense)
        self.options = cfg.engine_options.resolve(model, device, cfg.precision)
        self.engine = self.options.kind  # what run.json reports ("vectorised-packed(n)" when packed)
        self.bs = cfg.effective_batch_size
        self.shards = [s.to(device) for s in data.shards]
        snap = cfg.snapshot_round
        self.snapshot_round = snap if snap is None or snap > 0 else cfg.rounds

        torch.manual_seed(cfg.seed)
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.g_att = torch.Generator().manual_seed(cfg.seed + 7919)
        self.theta = model_to_flat(model).to(device)
        if cfg.defense in NEEDS_AUX and cfg.defense_params.get("pretrain", True):
            # Section 5.2 point 1: the server initialises theta by training on its auxiliary set D.
            engine.train_single(model, data.sets.aux_x, data.sets.aux_y, epochs=cfg.local_epochs, batch_size=self.bs,
                                lr=cfg.lr, generator=torch.Generator().manual_seed(cfg.seed + 15485863))
            self.theta = model_to_flat(model)
        self.rows: list[dict[str, Any]] = []
        self.client_rows: list[dict[str, Any]] = []
        self.round = 0
        self.chash = _config_hash(cfg)
        self._resume()
        self.wall0 = time.perf_counter()

    # -- checkpoints -------------------------------------------------------------------------------
    def _resume(self) -> None:
        """Restore the last good checkpoint: the latest, else the previous one (``.prev.pt``); a corrupt,
        foreign (another configuration) or mismatched one is skipped with a logged warning, and with none
        usable the run starts from round 1. Never resumes from a state it has not verified."""
        ckpt = self.ckpt_path
        if ckpt is None:
            return
        prev = ckpt.with_suffix(".prev.pt")
        if not (ckpt.exists() or prev.exists()):
            return
        st, used = None, None
        for path in (ckpt, prev):
            if not path.exists():
                continue
            try:
                cand = load_checkpoint(path)
                if cand.get("config_hash") != self.chash:
                    log.warning("checkpoint %s belongs to another configuration; ignored", path)
                    continue
                self._check_state(cand, path)
            except ValueError as exc:
                log.warning("%s; %s", exc, "trying the previous checkpoint" if path == ckpt else "ignored")
                if path == ckpt:
                    # drop it, so that the next checkpoint does not rotate it onto the good previous one
                    ckpt.unlink(missing_ok=True)
                continue
            st, used = cand, path
            break
        if st is None:
            log.warning("no usable checkpoint; starting from round 1")
            return
        self.theta = st["theta"].to(self.device)
        self.rows, self.client_rows = _rows_from_state(st)
        self.round = int(st["round"])
        _set_rng_state(st["rng"], self.g, self.g_att, self.device)
        log.info("resumed from checkpoint %s after round %d", used, self.round)

    def _check_state(self, st: dict[str, Any], path: Path) -> None:
        """Raise ValueError naming ``path`` unless ``st`` is a run state of this run's shapes."""
        def bad(msg: str) -> None:
            raise ValueError(f"checkpoint {path} does not match this run: {msg}")

        missing = sorted({"round", "theta", "rng", "rows", "client_rows"} - set(st))
        if missing:
            bad(f"missing {missing}")
        rnd = st["round"]
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= self.cfg.rounds:
            bad(f"round {rnd!r} is not in 1..{self.cfg.rounds}")
        th = st["theta"]
        if (not isinstance(th, torch.Tensor) or tuple(th.shape) != tuple(self.theta.shape)
                or th.dtype != self.theta.dtype):
            bad(f"global model {getattr(th, 'dtype', type(th))} {tuple(getattr(th, 'shape', ()))}, expected "
                f"{self.theta.dtype} {tuple(self.theta.shape)} (another model?)")
        if not bool(torch.isfinite(th).all()):
            bad("the global model is not finite")
        for key, widths, n_rows in (("rows", _widths(results.ROUND_COLUMNS, results.ROUND_OPTIONAL_COLUMNS), rnd),
                                    ("client_rows", _widths(results.CLIENT_COLUMNS, results.CLIENT_OPTIONAL_COLUMNS),
                                     rnd * self.cfg.n_clients)):
            t = st[key]  # rows without some optional columns: a checkpoint of an older version
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or (tuple(t.shape) not in
                                                                    {(n_rows, w) for w in widths}):
                bad(f"{key} has shape {tuple(getattr(t, 'shape', ()))}, expected {(n_rows, widths[0])}")
        want = _rng_state(self.g, self.g_att, self.device)
        rng = st["rng"]
        if not isinstance(rng, dict) or any(
                not isinstance(rng.get(k), torch.Tensor) or rng[k].dtype != v.dtype or rng[k].shape != v.shape
                for k, v in want.items() if k != "cuda"):
            bad("RNG states of the wrong kind or size")

    def _checkpoint(self) -> None:
        ckpt = self.ckpt_path
        if ckpt is None or not self.cfg.checkpoint_every or self.round % self.cfg.checkpoint_every or self.done:
            return
        if ckpt.exists():
            ckpt.replace(ckpt.with_suffix(".prev.pt"))
        save_checkpoint(ckpt, {"round": self.round, "theta": self.theta.cpu(), "config_hash": self.chash,
                               "rng": _rng_state(self.g, self.g_att, self.device),
                               **_rows_to_state(self.rows, self.client_rows)})

    @property
    def done(self) -> bool:
        return self.round >= self.cfg.rounds

    # -- one round ---------------------------------------------------------------------------------
    def benign_plan(self) -> BatchPlan:
        """This round's mini-batches of the benign clients (drawn from this cell's own generator)."""
        return engine.batch_plan([self.shards[i] for i in self.benign], self.cfg.local_epochs, self.bs, self.g)

    def train(self, clients: list[int], **how: Any) -> torch.Tensor:
        """Local training of ``clients`` from the global model (the engine of this run's options; ``how``:
        ``plan`` or ``generator``)."""
        return engine.train_clients(self.model, self.theta, self.data.x_train, self.data.y_train,
                                    [self.shards[i] for i in clients], epochs=self.cfg.local_epochs,
                                    batch_size=self.bs, lr=self.cfg.lr, precision=self.cfg.precision,
                                    options=self.options, **how)

    def train_benign(self) -> torch.Tensor:
        """Train this cell's benign clients on their own (no packing)."""
        return self.train(self.benign, plan=self.benign_plan())

    def step(self, ben: torch.Tensor, train_s: float) -> dict[str, Any]:
        """Finish the round given the benign updates ``ben (n_ben, d)``; returns the round's metrics row."""
        cfg, data, device, model = self.cfg, self.data, self.device, self.model
        rnd = self.round + 1
        n, d, mal, theta = cfg.n_clients, self.spec.dim, self.mal, self.theta
        t1 = time.perf_counter()
        updates = torch.empty(n, d, device=device, dtype=theta.dtype)
        updates[self.benign] = ben
        if self.attack_fn is not None:
            x_tr, y_tr = data.x_train, data.y_train
            ctx = AttackContext(
                model=model, global_flat=theta, benign_updates=ben, n_attackers=len(mal), n_clients=n, round=rnd,
                attacker_data=[(engine.prepare_inputs(x_tr[self.shards[i]]), y_tr[self.shards[i]]) for i in mal],
                backdoor_x=None if data.sets.bd_train_x is None else engine.prepare_inputs(data.sets.bd_train_x),
                backdoor_y=data.sets.bd_train_y, lr=cfg.lr, local_epochs=cfg.local_epochs, batch_size=self.bs,
                num_classes=data.num_classes, defense=cfg.defense, f=cfg.n_attackers,
                params=dict(cfg.attack_params), generator=self.g_att, device=device, engine=self.options)
            crafted = self.attack_fn(ctx)
            if not isinstance(crafted, torch.Tensor) or not crafted.is_floating_point():
                got = getattr(crafted, "dtype", type(crafted).__name__)
                raise ValueError(f"attack {cfg.attack!r} returned {got}, expected a floating-point tensor")
            if tuple(crafted.shape) != (len(mal), d):
                raise ValueError(f"attack {cfg.attack!r} returned shape {tuple(crafted.shape)}, expected {(len(mal), d)}")
            updates[mal] = crafted.to(updates.dtype)
        elif mal:
            # attackers configured but no attack: they train honestly
            updates[mal] = self.train(mal, generator=self.g)
        _sync(device)
        t2 = time.perf_counter()

        keep = screen_updates(updates, d)
        norms = torch.linalg.vector_norm(updates, dim=1).tolist()
        plrs = None
        if cfg.defense in NEEDS_AUX or rnd == self.snapshot_round:
            plrs = engine.model_plrs(model, theta.unsqueeze(0) + torch.nan_to_num(updates), data.sets.aux_x)
            finite_plr = torch.isfinite(plrs).flatten(1).all(1)
            if cfg.defense in NEEDS_AUX and not bool(finite_plr[keep].all()):
                log.warning("excluding client(s) %s: their models give non-finite PLRs",
                            (keep & ~finite_plr).nonzero().flatten().tolist())
                keep = keep & finite_plr
        kept = keep.nonzero().flatten()
        weights = torch.zeros(n, device=device)
        if len(kept) == 0:
            log.warning("round %d: every update was excluded; the global model is left unchanged", rnd)
            agg_update = torch.zeros(d, device=device)
        else:
            sctx = ServerContext(
                n_clients=len(kept), f=cfg.defense_params.get("f", max(cfg.n_attackers, 1)),
                params={k: v for k, v in cfg.defense_params.items() if k not in ("f", "pretrain")},
                plr_fn=(lambda u, _p=plrs, _k=kept: _p[_k]) if plrs is not None else None,
                server_update_fn=((lambda: _server_update(model, theta, data.sets, cfg,
                                                          torch.Generator().manual_seed(cfg.seed * 1_000_003 + rnd)))
                                  if cfg.defense in NEEDS_ROOT else None))
            res = self.defense_fn(updates[kept], sctx)
            agg_update = res.update
            weights[kept] = res.weights.to(weights.dtype)
        if not bool(torch.isfinite(agg_update).all()):
            raise FloatingPointError(f"round {rnd}: defense {cfg.defense!r} produced a non-finite aggregate; "
                                     "the global model was not updated")
        new_theta = theta + agg_update.to(theta.dtype)
        if not bool(torch.isfinite(new_theta).all()):  # finite aggregate, but theta + aggregate overflows
            raise FloatingPointError(f"round {rnd}: the aggregate of defense {cfg.defense!r} (norm "
                                     f"{float(agg_update.double().norm()):.3g}) makes the global model non-finite; "
                                     "the global model was not updated")
        self.theta = new_theta
        _sync(device)
        t3 = time.perf_counter()

        load_flat_(model, self.theta)
        row: dict[str, Any] = {"round": rnd, "train_s": train_s, "attack_s": t2 - t1, "agg_s": t3 - t2,
                               "n_excluded": int(n - len(kept))}
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            acc, loss = engine.evaluate(model, data.x_test, data.y_test)
            if not math.isfinite(loss):
                log.warning("round %d: the global model (finite) gives a non-finite test loss (%s) after defense %r "
                            "accepted an update of norm %.3g; clients training from it produce non-finite updates, "
                            "which the server excludes", rnd, loss, cfg.defense, float(agg_update.double().norm()))
        else:
            acc, loss = float("nan"), float("nan")
        asr, conf = (backdoor_metrics(model, data.sets.bd_eval_x, data.sets.bd_eval_y) if self.targeted
                     else (float("nan"), float("nan")))
        row.update(test_acc=acc, test_loss=loss, asr=asr, target_conf=conf)
        diag = attack_diagnostics(updates, self.benign, max(len(mal), 1))  # reads only: no RNG, no state
        diag["selected"] = weights > 0
        row.update(attacker_summary(diag, diag["selected"], mal))
        self.rows.append(row)
        det = detected(weights)
        diag = {k: v.tolist() for k, v in diag.items()}
        for i in range(n):
            self.client_rows.append({"round": rnd, "client": i, "malicious": int(i in mal),
                                     "weight": float(weights[i]), "detected": int(det[i]),
                                     "update_norm": norms[i], "dist_ratio": diag["dist_ratio"][i],
                                     "krum_rank": diag["krum_rank"][i], "selected": int(diag["selected"][i])})
        log.info("[%s seed %d] round %d/%d acc=%.4f loss=%.4f asr=%s conf=%s weights=[%s] excluded=%d "
                 "(train %.2fs, attack %.2fs, agg %.2fs)", cfg.defense, cfg.seed, rnd, cfg.rounds, acc, loss,
                 _fmt(asr), _fmt(conf), " ".join(f"{w:.3f}" for w in weights.tolist()), n - len(kept),
                 train_s, t2 - t1, t3 - t2)
        if rnd == self.snapshot_round:
            _write_snapshot(self.out_dir / "snapshot.npz", model, self.spec, theta, updates, plrs, data, mal, rnd)
        self.round = rnd
        self._checkpoint()
        return row

    def finish(self) -> dict[str, Any]:
        """Write ``rounds.csv`` and ``clients.csv`` atomically, drop the checkpoints, return final metrics."""
        with atomic_open(self.out_dir / "rounds.csv") as fh:
            pd.DataFrame(self.rows, columns=ROUND_COLUMNS).to_csv(fh, index=False, float_format="%.6g")
        with atomic_open(self.out_dir / "clients.csv") as fh:
            pd.DataFrame(self.client_rows, columns=CLIENT_COLUMNS).to_csv(fh, index=False, float_format="%.6g")
        if self.ckpt_path is not None:
            remove_checkpoints(self.ckpt_path)
        last = self.rows[-1]
        return {"test_acc": last["test_acc"], "test_loss": last["test_loss"], "asr": last["asr"],
                "target_conf": last["target_conf"], "sim_wall_s": time.perf_counter() - self.wall0,
                "engine": self.engine, **self.options.report()}


def simulate(cfg: RunConfig, data: RunData, out_dir: Path, ckpt_path: Path | None = None,
             device: torch.device | None = None) -> dict[str, Any]:
    """Run the FL simulation of one cell; write ``rounds.csv``, ``clients.csv`` (and ``snapshot.npz``)
    into ``out_dir`` atomically and return the final metrics."""
    sim = Simulation(cfg, data, out_dir, ckpt_path, device)
    while not sim.done:
        t0 = time.perf_counter()
        ben = sim.train_benign()
        _sync(sim.device)
        sim.step(ben, time.perf_counter() - t0)
    return sim.finish()


def simulate_many(sims: list[Simulation]) -> list[dict[str, Any]]:
    """Advance several cells in lock-step, training the benign clients of all of them in ONE vectorised
    call per round (per-client starting models, one batch plan per cell from that cell's own generator).

    The cells must share the architecture, the training arrays and the local-training hyper-parameters
    (epochs, batch size, lr, precision). Dropout masks come from the global RNG, so a packed run is
    reproducible for the same pack but not bit-identical to the same cell run alone.
    """
    if not sims:
        return []
    for s in sims:
        s.engine = f"vectorised-packed({len(sims)})"
    ref = sims[0]
    key = lambda s: (type(s.model), s.cfg.local_epochs, s.bs, s.cfg.lr, s.cfg.precision, s.options,  # noqa: E731
                     id(s.data.x_train))
    if any(key(s) != key(ref) for s in sims):
        raise ValueError("simulate_many: cells differ in model, data or local-training hyper-parameters")
    while any(not s.done for s in sims):
        active = [s for s in sims if not s.done]
        t0 = time.perf_counter()
        plans = [s.benign_plan() for s in active]
        thetas = torch.cat([s.theta.unsqueeze(0).expand(len(s.benign), -1) for s in active])
        shards = [s.shards[i] for s in active for i in s.benign]
        ben_all = engine.train_clients(ref.model, thetas, ref.data.x_train, ref.data.y_train, shards,
                                       epochs=ref.cfg.local_epochs, batch_size=ref.bs, lr=ref.cfg.lr,
                                       precision=ref.cfg.precision, plan=engine.concat_plans(plans),
                                       options=ref.options.packed())
        _sync(ref.device)
        train_s = (time.perf_counter() - t0) / len(active)
        a = 0
        for s in active:
            nb = len(s.benign)
            s.step(ben_all[a:a + nb], train_s)
            a += nb
    return [s.finish() for s in sims]


def _fmt(v: float) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _server_update(model: PLRModel, theta: torch.Tensor, sets: ServerSets, cfg: RunConfig, g: torch.Generator) -> torch.Tensor:
    """FLTrust's server model update g_0: train the current global model on the root set (Cao et al.)."""
    shard = torch.arange(len(sets.root_y), device=theta.device)
    return engine.train_clients(model, theta, sets.root_x, sets.root_y, [shard], epochs=cfg.local_epochs,
                                batch_size=cfg.effective_batch_size, lr=cfg.lr, generator=g,
                                options=engine.SEQUENTIAL)[0]


def _rows_to_state(rows: list[dict[str, Any]], client_rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": torch.tensor([[float(r[c]) for c in ROUND_COLUMNS] for r in rows], dtype=torch.float64),
            "client_rows": torch.tensor([[float(r[c]) for c in CLIENT_COLUMNS] for r in client_rows], dtype=torch.float64)}


def _widths(required: tuple[str, ...], optional: tuple[str, ...]) -> tuple[int, ...]:
    """Row widths a checkpoint may hold: every column first, then those of older versions (optional
    columns are appended in the order they were introduced, so an older row is a prefix)."""
    return tuple(len(required) + k for k in range(len(optional), -1, -1))


def _rows_from_state(st: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ints = {"round", "n_excluded", "client", "malicious", "detected", "selected"}

    def conv(t: torch.Tensor, cols: list[str]) -> list[dict[str, Any]]:
        pad = [math.nan] * (len(cols) - t.shape[1])  # optional columns a legacy checkpoint lacks (NaN)
        return [{c: (int(v) if c in ints and not math.isnan(v) else float(v)) for c, v in zip(cols, r.tolist() + pad)}
                for r in t]

    return conv(st["rows"], ROUND_COLUMNS), conv(st["client_rows"], CLIENT_COLUMNS)


@torch.no_grad()
def _write_snapshot(path: Path, model: PLRModel, spec: ParamSpec, theta_prev: torch.Tensor, updates: torch.Tensor,
                    aux_plrs: torch.Tensor | None, data: RunData, mal: list[int], rnd: int) -> None:
    """PLRs of every local model on the probe inputs, their class templates and the MMD matrix on the
    auxiliary set: the material of Figures 1, 4, 6, 10 and 11."""
    flats = theta_prev.unsqueeze(0) + torch.nan_to_num(updates)
    out: dict[str, np.ndarray] = {"round": np.array(rnd), "malicious": np.isin(np.arange(len(flats)), mal)}
    if data.sets.probe_x is not None:
        out["plrs"] = engine.model_plrs(model, flats, data.sets.probe_x).cpu().numpy().astype(np.float32)
        out["probe_y"] = data.sets.probe_y.cpu().numpy()
    head_w = [n for n in spec.names if n.startswith("head.") and n.endswith("weight")][-1]
    out["templates"] = spec.unflatten(flats)[head_w].cpu().numpy().astype(np.float32)
    if aux_plrs is not None and bool(torch.isfinite(aux_plrs).all()):
        out["mmd"] = agg.pairwise_mmd2(aux_plrs).cpu().numpy()
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **out)


def write_run_json(out_dir: Path, payload: dict[str, Any]) -> None:
    atomic_write_json(Path(out_dir) / "run.json", payload)


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
