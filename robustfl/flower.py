"""robustfl's defenses as Flower strategies (``pip install "robustfl[flower]"``; tested with flwr 1.42.0).

:class:`DefenseStrategy` is a ``flwr.server.strategy.FedAvg`` whose ``aggregate_fit`` is a registered
robustfl defense (:data:`robustfl.aggregation.defenses.DEFENSES`): the clients' parameters are flattened into
updates ``delta_i = w_i - theta`` relative to the global parameters the round was sent (Section 3.1), the
server screens them as robustfl's simulation does (:mod:`robustfl.fl.screening`: a client whose update or
PLRs hold NaN/Inf is dropped), the rule aggregates, and ``theta + aggregate`` (Eq. 6) goes back as the new
global parameters. Everything else (client sampling, evaluation, fit configs) is Flower's FedAvg.

* FLARE computes every client's PLRs on the server's auxiliary set from the parameters it received, so the
  strategy needs the architecture (``model_fn``, a :class:`robustfl.models.PLRModel`: ``features`` gives the
  PLR) and the set (``aux``); like robustfl's simulation it first trains the initial model on that set
  (Section 5.2, point 1; ``defense_params={"pretrain": False}`` turns it off).
* FLTrust trains the server's own update on its root set (``root``) every round with
  :func:`robustfl.fl.simulate.root_update` and ``local_epochs`` / ``batch_size`` / ``lr``.
* ``fedavg`` is robustfl's equal-weight mean (the paper's equal shards), not Flower's ``num_examples``
  weighting.

The parameters travel as the model's tensors in ``model.parameters()`` order (:func:`model_arrays`,
:func:`load_arrays`), all floating point. The results are sorted by client id before aggregating, so the
rows do not depend on the order in which the clients' answers arrive. The returned fit metrics hold
``weight/<cid>`` (the rule's weight of each client, 0 for a client dropped by screening), ``n_kept`` and
``defense``; :attr:`DefenseStrategy.rounds` keeps each round's :class:`RoundRecord` (weights, the rule's
``info``, the clients' own fit metrics).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

try:
    from flwr.common import (
        FitIns,
        FitRes,
        Parameters,
        Scalar,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import FedAvg
except ImportError as exc:  # pragma: no cover - exercised only without flwr
    raise ImportError('robustfl.flower needs Flower: pip install "robustfl[flower]" '
                      f"(flwr[simulation]==1.42.0); importing flwr failed: {exc}") from exc

from robustfl import engine
from robustfl.aggregation.defenses import DEFENSES, NEEDS_AUX, NEEDS_ROOT, ServerContext, check_defense_params
from robustfl.fl.screening import apply_aggregate, screen_plrs, screen_updates
from robustfl.fl.simulate import root_update
from robustfl.models import PLRModel
from robustfl.params import model_to_flat

log = logging.getLogger("robustfl")

#: the Flower release the strategies are tested against (pyproject's ``flower`` extra pins it)
FLWR_TESTED = "1.42.0"

__all__ = ["FLWR_TESTED", "ArrayLayout", "DefenseStrategy", "RoundRecord", "flatten_arrays", "load_arrays",
           "model_arrays", "unflatten_arrays"]


# ------------------------------------------------------------------------------------- flat <-> arrays
@dataclass(frozen=True)
class ArrayLayout:
    """Shapes and dtypes of a list of parameter arrays, in order (what :func:`unflatten_arrays` rebuilds)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @property
    def dim(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))


def flatten_arrays(arrays: Sequence[np.ndarray], what: str = "parameters") -> tuple[torch.Tensor, ArrayLayout]:
    """A list of floating-point arrays -> one ``(d,)`` tensor (each array in C order, one after the other;
    float32 unless an array is float64) and their layout. A non-floating or empty list is a ``ValueError``."""
    if len(arrays) == 0:
        raise ValueError(f"{what}: no arrays")
    arrs = [np.asarray(a) for a in arrays]
    for k, a in enumerate(arrs):
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{what}: array {k} has dtype {a.dtype}; the strategies aggregate floating-point "
                             "parameters only (send the model's parameters, not integer buffers)")
    dtype = np.float64 if any(a.dtype == np.float64 for a in arrs) else np.float32
    flat = np.concatenate([a.astype(dtype, copy=False).reshape(-1) for a in arrs])
    layout = ArrayLayout(tuple(tuple(int(s) for s in a.shape) for a in arrs), tuple(a.dtype for a in arrs))
    return torch.from_numpy(flat), layout


def unflatten_arrays(flat: torch.Tensor, layout: ArrayLayout) -> list[np.ndarray]:
    """Inverse of :func:`flatten_arrays`: ``(d,)`` -> the arrays with the layout's shapes and dtypes."""
    if flat.dim() != 1 or flat.numel() != layout.dim:
        raise ValueError(f"flat parameters have shape {tuple(flat.shape)}, the layout needs ({layout.dim},)")
    v = flat.detach().cpu().numpy()
    out, a = [], 0
    for shape, dtype in zip(layout.shapes, layout.dtypes):
        b = a + int(np.prod(shape))
        out.append(v[a:b].reshape(shape).astype(dtype, copy=True))
        a = b
    return out


def model_arrays(model: torch.nn.Module) -> list[np.ndarray]:
    """The model's parameters as the arrays a client sends (``model.parameters()`` order)."""
    return [p.detach().cpu().numpy().copy() for p in model.parameters()]


def load_arrays(model: torch.nn.Module, arrays: Sequence[np.ndarray]) -> torch.nn.Module:
    """Copy arrays in ``model.parameters()`` order into the model (shapes checked); returns the model."""
    params = list(model.parameters())
    if len(arrays) != len(params):
        raise ValueError(f"got {len(arrays)} arrays, the model has {len(params)} parameter tensors")
    with torch.no_grad():
        for k, (p, a) in enumerate(zip(params, arrays)):
            if tuple(np.shape(a)) != tuple(p.shape):
                raise ValueError(f"array {k} has shape {tuple(np.shape(a))}, the model's parameter {tuple(p.shape)}")
            p.copy_(torch.tensor(np.asarray(a), dtype=p.dtype))  # a copy: Flower's arrays are read-only
    return model


# ------------------------------------------------------------------------------------------ the strategy
@dataclass
class RoundRecord:
    """One round's aggregation: the client ids (sorted), each one's weight (0: dropped by screening),
    the kept rows, the rule's ``info`` and the clients' own fit metrics."""

    round: int
    cids: list[str]
    weights: list[float]
    kept: list[int]
    info: dict[str, Any] = field(default_factory=dict)
    client_metrics: list[dict[str, Scalar]] = field(default_factory=list)


def _as_tensors(pair: tuple[Any, Any] | None, what: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if pair is None:
        return None
    if not isinstance(pair, tuple) or len(pair) != 2:
        raise ValueError(f"{what} must be a pair (x, y), got {type(pair).__name__}")
    x, y = (torch.tensor(np.asarray(v)) for v in pair)  # copies (read-only memmaps are fine)
    if x.dim() != 4 or not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"{what}: x must be uint8 (N, H, W, C) or float (N, C, H, W) images, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x) or len(y) == 0:
        raise ValueError(f"{what}: y must be (N,) labels for the N = {len(x)} images, got shape {tuple(y.shape)}")
    return x, y.long()


class DefenseStrategy(FedAvg):
    """A Flower strategy that aggregates with robustfl's defense ``defense`` (see the module docstring).

    ``defense_params``: the rule's parameters as in a robustfl cell (``f`` there overrides ``f``;
    ``pretrain`` is FLARE's pre-training on the auxiliary set, default True). ``f``: the number of attackers
    the server assumes. ``model_fn``: a zero-argument factory of the clients' architecture (needed by FLARE
    and FLTrust; also the initial parameters when ``initial_parameters`` is not given). ``aux`` / ``root``:
    the server's ``(x, y)`` for FLARE / FLTrust. ``local_epochs`` / ``batch_size`` / ``lr``: the server's own
    training (FLARE's pre-training, FLTrust's root update). ``seed``: the server's random stream (DnC,
    SignGuard, FLAME, weak DP, bucketing, its own training). Other keyword arguments go to FedAvg.
    """

    def __init__(self, defense: str, *, defense_params: dict[str, Any] | None = None, f: int = 1,
                 model_fn: Callable[[], PLRModel] | None = None, aux: tuple[Any, Any] | None = None,
                 root: tuple[Any, Any] | None = None, local_epochs: int = 1, batch_size: int = 32,
                 lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu", **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.defense = defense
        self.defense_fn = DEFENSES.get(defense)  # unknown name: the registry's error listing the known ones
        params = dict(defense_params or {})
        f = params.pop("f", f)
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"f (the number of attackers the server assumes) must be an int >= 0, got {f!r}")
        self.f = f
        self.pretrain = bool(params.pop("pretrain", True)) and defense in NEEDS_AUX
        check_defense_params(defense, params)
        self.params = params
        for name, v in (("local_epochs", local_epochs), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.local_epochs, self.batch_size, self.lr, self.seed = local_epochs, batch_size, float(lr), int(seed)
        self.device = torch.device(device)
        self.aux = _as_tensors(aux, "aux")
        self.root = _as_tensors(root, "root")
        if defense in NEEDS_AUX and (model_fn is None or self.aux is None):
            raise ValueError(f"defense {defense!r} computes the clients' PLRs on the server's auxiliary set: "
                             "give model_fn (the architecture) and aux=(x, y)")
        if defense in NEEDS_ROOT and (model_fn is None or self.root is None):
            raise ValueError(f"defense {defense!r} trains the server's update on its root set: give model_fn "
                             "(the architecture) and root=(x, y)")
        self.model_fn = model_fn
        self.model: PLRModel | None = None
        if model_fn is not None:
            self.model = model_fn().to(self.device)
            if defense in NEEDS_AUX and not hasattr(self.model, "features"):
                raise ValueError(f"defense {defense!r}: model_fn must build a robustfl.models.PLRModel (its "
                                 "`features` give the PLR)")
        if self.aux is not None:
            self.aux = (self.aux[0].to(self.device), self.aux[1].to(self.device))
        if self.root is not None:
            self.root = (self.root[0].to(self.device), self.root[1].to(self.device))
        # kept by the server across rounds, as robustfl's simulation does (ServerContext.state / .generator)
        self.state: dict[str, Any] = {}
        self.generator = torch.Generator().manual_seed(self.seed + 104729)
        self.client_index: dict[str, int] = {}
        self.rounds: list[RoundRecord] = []
        self._global: list[np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"DefenseStrategy(defense={self.defense!r}, f={self.f}, params={self.params})"

    # -- parameters ----------------------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The initial global parameters: ``initial_parameters``, else ``model_fn()``'s (else Flower asks a
        client); for FLARE first trained on the auxiliary set (Section 5.2, point 1)."""
        params = super().initialize_parameters(client_manager)
        if params is None and self.model is not None:
            params = ndarrays_to_parameters(model_arrays(self.model))
        if params is not None and self.pretrain:
            model, (x, y) = self._model(), self.aux  # type: ignore[misc]
            load_arrays(model, parameters_to_ndarrays(params))
            engine.train_single(model, x, y, epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                                generator=torch.Generator().manual_seed(self.seed + 15485863))
            params = ndarrays_to_parameters(model_arrays(model))
        return params

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's, keeping the global parameters of the round (the updates are relative to them)."""
        self._global = parameters_to_ndarrays(parameters)
        return super().configure_fit(server_round, parameters, client_manager)

    def _model(self) -> PLRModel:
        if self.model is None:
            raise ValueError(f"defense {self.defense!r} needs model_fn")
        return self.model

    # -- aggregation ---------------------------------------------------------------------------------
    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Screen and aggregate the clients' updates with the defense; returns the new global parameters
        and the metrics (``weight/<cid>``, ``n_kept``, ``defense``, plus ``fit_metrics_aggregation_fn``'s)."""
        if not results:
            return None, {}
        if failures and not self.accept_failures:
            return None, {}
        if self._global is None:
            raise ValueError("aggregate_fit before configure_fit: the strategy does not know the global parameters")
        results = sorted(results, key=lambda r: str(r[0].cid))
        cids = [str(proxy.cid) for proxy, _ in results]
        theta, layout = flatten_arrays(self._global, "global parameters")
        theta = theta.to(self.device)
        rows = []
        for cid, (_, res) in zip(cids, results):
            w, lay = flatten_arrays(parameters_to_ndarrays(res.parameters), f"client {cid}")
            if lay.shapes != layout.shapes:
                raise ValueError(f"client {cid} sent arrays of shapes {list(lay.shapes)}, the global parameters "
                                 f"have {list(layout.shapes)}")
            rows.append(w)
        updates = torch.stack(rows).to(self.device, theta.dtype) - theta
        n, d = updates.shape
        if self.model is not None and sum(p.numel() for p in self.model.parameters()) != d:
            raise ValueError(f"the parameters have d = {d} entries, model_fn's model "
                             f"{sum(p.numel() for p in self.model.parameters())}")
        keep = screen_updates(updates, d)
        plrs = None
        if self.defense in NEEDS_AUX:
            model = self._model()
            flats = (theta.unsqueeze(0) + torch.nan_to_num(updates)).to(model_to_flat(model).dtype)
            plrs = engine.model_plrs(model, flats, self.aux[0])  # type: ignore[index]
            keep = screen_plrs(keep, plrs)
        kept = keep.nonzero().flatten()
        weights = torch.zeros(n, dtype=torch.float64)
        info: dict[str, Any] = {}
        if len(kept) == 0:
            log.warning("round %d: every update was excluded; the global parameters are left unchanged", server_round)
            new_theta = theta
        else:
            ctx = ServerContext(
                n_clients=len(kept), f=self.f, params=dict(self.params),
                plr_fn=(lambda u, _p=plrs, _k=kept: _p[_k]) if plrs is not None else None,
                server_update_fn=((lambda: self._root_update(theta, server_round)) if self.defense in NEEDS_ROOT
                                  else None),
                state=self.state, generator=self.generator,
                client_ids=[self.client_index.setdefault(cids[i], len(self.client_index)) for i in kept.tolist()])
            res = self.defense_fn(updates[kept], ctx)
            weights[kept] = res.weights.detach().cpu().to(torch.float64)
            info = res.info
            new_theta = apply_aggregate(theta, res.update, server_round, self.defense)
        self.rounds.append(RoundRecord(server_round, cids, weights.tolist(), kept.tolist(), info,
                                       [dict(r.metrics) for _, r in results]))
        metrics: dict[str, Scalar] = {"defense": self.defense, "n_kept": int(len(kept))}
        metrics.update({f"weight/{cid}": float(w) for cid, w in zip(cids, weights.tolist())})
        if self.fit_metrics_aggregation_fn is not None:
            metrics.update(self.fit_metrics_aggregation_fn([(r.num_examples, r.metrics) for _, r in results]))
        return ndarrays_to_parameters(unflatten_arrays(new_theta, layout)), metrics

    def _root_update(self, theta: torch.Tensor, server_round: int) -> torch.Tensor:
        """FLTrust's server update on the root set from the round's global parameters."""
        model, (x, y) = self._model(), self.root  # type: ignore[misc]
        dtype = model_to_flat(model).dtype
        out = root_update(model, theta.to(dtype), x, y, epochs=self.local_epochs, batch_size=self.batch_size,
                          lr=self.lr, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + server_round))
        return out.to(theta.dtype)
