"""Local training of the clients (Section 3.1 step 2, Section 6.1: Adam, lr 1e-3, E local epochs).

Two engines that compute the same updates, chosen by :func:`train_clients` from ``EngineOptions.kind``:

* :func:`train_vectorised` trains all clients of a call at once on stacked ``(n, ...)`` parameters
  (its jobs: :func:`_schedule` which clients each step computes, :func:`_step_state` the parameters and
  Adam moments, kept CUDA graphs included, :func:`_gradient_fn` the step's gradients, :func:`_run_steps`
  the steps);
* :func:`train_sequential` is the plain reference: one model and one ``torch.optim.Adam`` per client.

Both draw their mini-batches from the same :func:`batch_plan`, so with dropout off they agree to
float tolerance (tests/test_train.py).
"""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from robustfl.engine import stacked
from robustfl.engine.adam import ADAM_BETAS, ADAM_EPS, adam_step, adam_step_uniform
from robustfl.engine.common import masked_ce, prepare_inputs, x_shape_nchw
from robustfl.engine.graphs import GraphCache, capture
from robustfl.engine.options import LAYOUTS, PRECISIONS, EngineOptions
from robustfl.params import ParamSpec, load_flat_, model_to_flat


@dataclass
class BatchPlan:
    """Mini-batch indices for n clients: ``idx (n, S, B)`` into the training arrays, ``mask (n, S, B)``
    (1 = a real sample, 0 = padding for clients whose shard is shorter or whose last batch is partial)."""

    idx: torch.Tensor
    mask: torch.Tensor

    @property
    def steps(self) -> int:
        return self.idx.shape[1]


def batch_plan(shards: Sequence[torch.Tensor], epochs: int, batch_size: int, generator: torch.Generator) -> BatchPlan:
    """Per client and epoch a fresh random permutation of its shard, cut into batches of ``batch_size``
    (the last one partial, as Keras ``fit`` does). Clients with fewer batches are padded with masked
    steps so that all clients advance in lock-step."""
    # built per client with whole-tensor operations (one batch at a time, a 10-client fmnist round's 470
    # batches took ~0.1 s of host time before each round's training, and a GPU shard paid a copy per batch)
    n = len(shards)
    per_client: list[tuple[torch.Tensor, torch.Tensor]] = []
    for shard in shards:
        m = len(shard)
        nb = -(-m // batch_size) if m else 1  # batches per epoch, the last one partial (an empty shard: one empty)
        perms = [shard[torch.randperm(m, generator=generator)] for _ in range(epochs)]
        idx_i = torch.zeros(epochs, nb * batch_size, dtype=torch.long)
        mask_i = torch.zeros(epochs, nb * batch_size)
        if m and epochs:
            idx_i[:, :m] = torch.stack(perms).cpu()
            mask_i[:, :m] = 1.0
        per_client.append((idx_i.view(epochs * nb, batch_size), mask_i.view(epochs * nb, batch_size)))
    steps = max((len(i) for i, _ in per_client), default=0)
    idx = torch.zeros(n, steps, batch_size, dtype=torch.long)
    mask = torch.zeros(n, steps, batch_size)
    for i, (idx_i, mask_i) in enumerate(per_client):
        idx[i, : len(idx_i)] = idx_i
        mask[i, : len(mask_i)] = mask_i
    return BatchPlan(idx, mask)


def concat_plans(plans: Sequence[BatchPlan]) -> BatchPlan:
    """Stack the plans of several simulations (clients one after the other), padding to the longest."""
    steps = max(p.steps for p in plans)
    bs = plans[0].idx.shape[2]
    if any(p.idx.shape[2] != bs for p in plans):
        raise ValueError("cannot pack simulations with different batch sizes")
    idx = torch.cat([F.pad(p.idx, (0, 0, 0, steps - p.steps)) for p in plans])
    mask = torch.cat([F.pad(p.mask, (0, 0, 0, steps - p.steps)) for p in plans])
    return BatchPlan(idx, mask)


@dataclass
class _GraphSet:
    """CUDA graphs of :func:`train_vectorised`'s step per number of active clients, and the buffers
    they read and write."""

    net: nn.Module  # held, so that its id in the key is not reused
    params: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    graphs: dict[int, tuple]  # m -> (graph, static batch indices, static mask, static gradients)


_GRAPH_SETS = GraphCache()


def clear_graph_cache() -> None:
    """Drop the CUDA graphs kept between :func:`train_vectorised` calls (and their memory)."""
    _GRAPH_SETS.clear()


@contextlib.contextmanager
def precision_context(device: torch.device, precision: str, *, autocast: bool = True) -> Iterator[None]:
    """Training steps inside run in ``precision`` (:data:`PRECISIONS`); the global TF32 switches are
    restored on exit. ``autocast=False`` leaves bf16 autocast off (for a ``backward()`` call outside
    the autocast region, as PyTorch's AMP recipe has it) and keeps the TF32 switches."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda" or precision == "fp32" or (precision == "bf16" and not autocast):
        yield
    elif precision == "bf16":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def train_vectorised(model: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     shards: Sequence[torch.Tensor], *, epochs: int, batch_size: int, lr: float,
                     generator: torch.Generator | None, precision: str = "fp32",
                     plan: BatchPlan | None = None, options: EngineOptions | None = None) -> torch.Tensor:
    """Train ``len(shards)`` clients at once from ``theta (d,)`` (or client i from ``theta[i]`` of
    ``(n, d)``: packed runs) on ``x[shards[i]]``; return the updates ``w_i - theta`` ``(n, d)`` (Section 3.1).
    The clients' parameters are stacked ``(n, ...)``; one step computes every client's gradient on its
    own batch -- ``vmap(grad(loss))`` (``options.conv`` "vmap", any model) or the stacked forward pass and
    one backward (a layout of :mod:`robustfl.engine.stacked`), optionally replayed from CUDA graphs (one
    per number of clients computed, kept for the next call: ``options.cuda_graph``, ``graph_min_steps``,
    ``graph_cache``) -- and one Adam over the stacked tensors is n independent Adams. Clients whose
    batches have run out are not computed (``options.skip_idle``: ordered longest first, the active ones
    are a prefix; the same updates as masked batches). ``plan`` overrides the batches drawn from
    ``generator``; ``options`` default to vmap without graphs, ``auto`` resolved for the model and device.
    """
    n = len(shards)
    d = theta.shape[-1]
    if n == 0:
        return theta.new_zeros(0, d)
    device = theta.device
    opts = (options or EngineOptions(conv="vmap", cuda_graph=False)).replace(kind="vectorised")
    opts = opts.resolve(model, device, precision)
    _check_device(opts, device)
    if plan is None:
        plan = batch_plan(shards, epochs, batch_size, generator)
    theta_n = theta.detach().expand(n, d) if theta.dim() == 1 else theta.detach()
    sched = _schedule(plan, opts.skip_idle)
    if sched.order is not None:
        theta_n = theta_n[sched.order.to(theta_n.device)]
    spec = ParamSpec(model)
    key = (id(model), opts, precision, n, batch_size, tuple(spec.shapes), x.data_ptr(), tuple(x.shape), x.dtype,
           y.data_ptr(), tuple(y.shape), str(device), torch.backends.cuda.matmul.allow_tf32,
           torch.backends.cudnn.allow_tf32)
    state = _step_state(model, spec, theta_n, opts, key)
    grads_of = _gradient_fn(model, spec.names, x, y, batch_size, opts.conv, precision, device)
    was_training = model.training
    model.train()
    try:
        _run_steps(state, sched, grads_of, sched.plan.idx.to(device), sched.plan.mask.to(device), lr, opts)
    finally:
        model.train(was_training)
    out = spec.flatten(dict(zip(spec.names, state.params))) - theta_n
    if sched.order is not None:  # back to the callers' client order
        out = out[torch.argsort(sched.order).to(out.device)]
    return out


def _check_device(opts: EngineOptions, device: torch.device) -> None:
    """Refuse options the device cannot run: CUDA graphs off CUDA or with vmap, Triton kernels on the CPU
    without Triton's interpreter."""
    if opts.cuda_graph and opts.conv not in LAYOUTS:
        raise ValueError(f"cuda_graph needs conv in {LAYOUTS}, got {opts.conv!r}")
    if opts.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
    if opts.conv == "triton" and device.type != "cuda":
        from robustfl.engine import triton_conv  # its kernels were compiled or interpreted as decided at import

        if not triton_conv.INTERPRET:
            raise ValueError(f"conv 'triton' needs a CUDA device (or TRITON_INTERPRET=1), got {device}")


@dataclass
class _Schedule:
    """Which clients each step computes: the plan (reordered longest first when idle clients are
    skipped, ``order``), the number of clients computed at each step (``n_active``, a prefix; None: all),
    and the steps where every client has a real sample (``all_active``: the uniform Adam)."""

    plan: BatchPlan
    order: torch.Tensor | None
    n_active: list[int] | None
    all_active: list[bool]


def _schedule(plan: BatchPlan, skip_idle: bool) -> _Schedule:
    """:class:`_Schedule` of ``plan``. Steps where every client has a real sample are the common case and
    take the foreach fast path; the masked per-client path starts at the first step where one idles
    (padding only ever trails, see batch_plan), the same for any client order."""
    real = plan.mask.sum(2) > 0  # (n, steps): client i has a real sample at step s
    all_active = real.all(0).tolist()
    if skip_idle:
        n_steps = torch.where(real.any(1), plan.steps - real.flip(1).int().argmax(1), 0)
        if bool((n_steps != n_steps[0]).any()):
            order = torch.argsort(n_steps, descending=True, stable=True)
            steps = torch.arange(plan.steps, device=n_steps.device)
            n_active = (n_steps[order].unsqueeze(1) > steps).sum(0).tolist()
            return _Schedule(BatchPlan(plan.idx[order], plan.mask[order]), order, n_active, all_active)
    return _Schedule(plan, None, None, all_active)


@dataclass
class _StepState:
    """The stacked parameters and Adam moments a call trains (``(n, ...)`` per parameter), and the CUDA
    graphs kept with them (None: no graphs kept)."""

    params: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    kept: _GraphSet | None


def _step_state(model: nn.Module, spec: ParamSpec, theta_n: torch.Tensor, opts: EngineOptions,
                key: tuple) -> _StepState:
    """The call's starting models and fresh Adam states; with CUDA graphs kept between calls
    (``opts.graph_cache``), in the buffers of the set kept under ``key`` (which its graphs read)."""
    unflat = spec.unflatten(theta_n.contiguous())
    names = spec.names
    if not (opts.cuda_graph and opts.graph_cache > 0 and theta_n.device.type == "cuda"):
        params = [unflat[k].clone() for k in names]
        return _StepState(params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], None)
    gset = _GRAPH_SETS.take(key)
    if gset is None:
        gset = _GraphSet(model, [unflat[k].clone() for k in names], [torch.zeros_like(unflat[k]) for k in names],
                         [torch.zeros_like(unflat[k]) for k in names], {})
    else:  # the buffers the kept graphs read: this call's starting models, fresh Adam states
        for p, k in zip(gset.params, names):
            p.copy_(unflat[k])
        for t in gset.exp_avg + gset.exp_avg_sq:
            t.zero_()
    _GRAPH_SETS.keep(key, gset, opts.graph_cache)
    return _StepState(gset.params, gset.exp_avg, gset.exp_avg_sq, gset)


GradsOf = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], list[torch.Tensor]]


def _gradient_fn(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 conv: str, precision: str, device: torch.device) -> GradsOf:
    """``grads_of(params, idx (m, B), mask (m, B))``: every client's gradient of its masked mean
    cross-entropy on its batch (``x[idx]``), fp32, by ``vmap(grad(loss))`` over the per-client models
    (``conv`` "vmap") or by the stacked forward pass and one backward (a stacked layout)."""
    if conv in LAYOUTS:
        def grad_all(p: tuple[torch.Tensor, ...], xb: torch.Tensor, yb: torch.Tensor,
                     mb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return stacked.stacked_grads(model, names, p, xb, yb, mb, layout=conv)
    else:
        def loss_one(p: tuple[torch.Tensor, ...], xb: torch.Tensor, yb: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, dict(zip(names, p)), (xb,))
            return masked_ce(out, yb, mb)

        grad_all = vmap(grad(loss_one), in_dims=(0, 0, 0, 0), randomness="different")
    shape = x_shape_nchw(x)

    def grads_of(p_m: list[torch.Tensor], bi: torch.Tensor, mb: torch.Tensor) -> list[torch.Tensor]:
        xb = prepare_inputs(x[bi.reshape(-1)]).reshape(len(bi), batch_size, *shape)
        with precision_context(device, precision):
            return [g.float() for g in grad_all(tuple(p_m), xb, y[bi], mb)]
    return grads_of


def _run_steps(state: _StepState, sched: _Schedule, grads_of: GradsOf, idx: torch.Tensor, mask: torch.Tensor,
               lr: float, opts: EngineOptions) -> None:
    """Every step of the plan on the first m clients (views of the stacked state, updated in place):
    gradients (eager, or a CUDA graph per client count m, captured when m first comes if
    ``opts.graph_min_steps`` steps use it, or kept from an earlier call), then Adam: uniform while every
    client has a real sample, then masked per client."""
    params, exp_avg, exp_avg_sq = state.params, state.exp_avg, state.exp_avg_sq
    n = len(params[0])
    steps = idx.shape[1]
    step = torch.zeros(n, device=idx.device)
    graph = graph_m = None  # the CUDA graph in use and the number of clients it computes
    steps_with = collections.Counter([n] * steps if sched.n_active is None else sched.n_active)
    k = 0
    masked_mode = False
    for s in range(steps):
        m = n if sched.n_active is None else sched.n_active[s]
        p_m, a_m, v_m = ((params, exp_avg, exp_avg_sq) if m == n else
                         ([t[:m] for t in params], [t[:m] for t in exp_avg], [t[:m] for t in exp_avg_sq]))
        mb = mask[:m, s]
        if opts.cuda_graph and m != graph_m:  # the active prefix shrank (or the first step): new graph
            graph = graph_m = static_grads = None
            if state.kept is not None and m in state.kept.graphs:  # kept from an earlier call
                graph, static_bi, static_mb, static_grads = state.kept.graphs[m]
                graph_m = m
            elif steps_with[m] >= opts.graph_min_steps:
                static_bi, static_mb = idx[:m, s].clone(), mb.clone()
                graph, static_grads = capture(lambda p_m=p_m, bi=static_bi, mbs=static_mb: grads_of(p_m, bi, mbs))
                graph_m = m
                if state.kept is not None:
                    state.kept.graphs[m] = (graph, static_bi, static_mb, static_grads)
        if graph is not None:
            static_bi.copy_(idx[:m, s])
            static_mb.copy_(mb)
            graph.replay()
            grads = static_grads
        else:
            grads = grads_of(p_m, idx[:m, s], mb)
        if not masked_mode and sched.all_active[s]:
            k += 1
            adam_step_uniform(p_m, grads, a_m, v_m, k, lr)
        else:
            if not masked_mode:
                masked_mode = True
                step.fill_(k)
            adam_step(p_m, grads, a_m, v_m, step[:m], (mb.sum(1) > 0).float(), lr)


def train_sequential(model: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     shards: Sequence[torch.Tensor], *, epochs: int, batch_size: int, lr: float,
                     generator: torch.Generator | None, precision: str = "fp32",
                     plan: BatchPlan | None = None) -> torch.Tensor:
    """Reference engine: clients one after the other, each with its own ``torch.optim.Adam``, from
    ``theta (d,)`` or client i from ``theta[i]`` of ``(n, d)``. Same batches as :func:`train_vectorised`
    (same ``generator`` state -> same :func:`batch_plan`; or the given ``plan``)."""
    device = theta.device
    if plan is None:
        plan = batch_plan(shards, epochs, batch_size, generator)
    out = []
    was_training = model.training
    for i in range(len(shards)):
        start = theta if theta.dim() == 1 else theta[i]
        load_flat_(model, start)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        for s in range(plan.steps):
            mb = plan.mask[i, s].to(device)
            if mb.sum() == 0:
                continue
            bi = plan.idx[i, s].to(device)
            xb, yb = prepare_inputs(x[bi]), y[bi]
            opt.zero_grad(set_to_none=True)
            with precision_context(device, precision):
                loss = masked_ce(model(xb), yb, mb)
            with precision_context(device, precision, autocast=False):
                loss.backward()
            opt.step()
        out.append(model_to_flat(model) - start)
    model.train(was_training)
    return torch.stack(out) if out else theta.new_zeros(0, theta.shape[-1])


def train_clients(model: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  shards: Sequence[torch.Tensor], *, epochs: int, batch_size: int, lr: float,
                  options: EngineOptions, precision: str = "fp32", generator: torch.Generator | None = None,
                  plan: BatchPlan | None = None) -> torch.Tensor:
    """Local training of ``len(shards)`` clients (Section 3.1 step 2: E epochs of Adam mini-batch steps
    on client i's shard, the indices ``shards[i]`` into ``x``, ``y``) from ``theta (d,)``, or client i from
    ``theta[i]`` of ``(n, d)`` (several runs packed into one call); returns the updates ``w_i - theta``
    ``(n, d)``. The mini-batches are ``plan``, else drawn from ``generator`` (:func:`batch_plan`);
    ``options.kind`` picks the engine (resolved for the model and ``theta``'s device)."""
    opts = options.resolve(model, theta.device, precision)
    kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, generator=generator, precision=precision, plan=plan)
    if opts.kind == "sequential":
        return train_sequential(model, theta, x, y, shards, **kw)
    return train_vectorised(model, theta, x, y, shards, options=opts, **kw)


def train_single(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                 lr: float, generator: torch.Generator) -> None:
    """Train ``model`` in place on (x, y) with Adam: the server's own training (FLARE's pre-training on
    the auxiliary set, Section 5.2; FLTrust's root-set update, Cao et al. 2021)."""
    theta = model_to_flat(model)
    shard = torch.arange(len(y))
    delta = train_sequential(model, theta, x, y, [shard], epochs=epochs, batch_size=batch_size, lr=lr,
                             generator=generator)
    load_flat_(model, theta + delta[0])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """Test accuracy and mean cross-entropy of ``model`` on (x, y)."""
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, len(y)
    for a in range(0, n, batch):
        out = model(prepare_inputs(x[a:a + batch])).float()
        loss += F.cross_entropy(out, y[a:a + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[a:a + batch]).sum().item()
    model.train(was)
    return correct / max(n, 1), loss / max(n, 1)


@torch.no_grad()
def model_plrs(model: nn.Module, flats: torch.Tensor, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """PLRs of n models (rows of ``flats (n, d)``) on the same inputs: ``(n, m, o)`` (Alg. 1 lines 4-5).
    Models run in eval mode (no dropout); ``chunk`` bounds memory for large n."""
    spec = ParamSpec(model)
    xb = prepare_inputs(x)
    was = model.training
    model.eval()

    def plr_one(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return features_call(model, p, xb)

    outs = [vmap(plr_one)(spec.unflatten(flats[a:a + chunk])) for a in range(0, len(flats), chunk)]
    model.train(was)
    return torch.cat(outs).float()


def features_call(model: nn.Module, params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
    """The PLR g_w(x) of the model with parameters ``params`` (a full parameter dict)."""
    feats = {k[len("features."):]: v for k, v in params.items() if k.startswith("features.")}
    return functional_call(model.features, feats, (xb,))
