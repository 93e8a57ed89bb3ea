"""Local training of the clients (Section 3.1 step 2, Section 6.1: Adam, lr 1e-3, E local epochs).

Two engines that compute the same updates:

* :func:`train_vectorised` trains all clients of a round at once: the client parameters are stacked
  into ``(n, *shape)`` tensors and one ``torch.func.vmap(grad(loss))`` call gives every client's
  gradient for its own mini-batch; Adam is elementwise, so one Adam over the stacked tensors is n
  independent Adams (:func:`adam_step`).
* :func:`train_sequential` is the plain reference: one model and one ``torch.optim.Adam`` per client.

Both draw their mini-batches from the same :func:`batch_plan`, so with dropout off they agree to
float tolerance (tests/test_train.py).
"""
from __future__ import annotations

import collections
import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from robustfl.engine import stacked
from robustfl.config import PRECISIONS
from robustfl.params import ParamSpec

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


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


def masked_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the real (mask = 1) samples of a batch."""
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)


def adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
              exp_avg_sq: list[torch.Tensor], step: torch.Tensor, active: torch.Tensor, lr: float) -> None:
    """One Adam step (Kingma & Ba 2015, as ``torch.optim.Adam`` computes it) on stacked ``(n, ...)``
    tensors, in place. ``step (n,)`` counts each client's own steps; clients with ``active = 0`` (no real
    sample in this batch) are left untouched, so unequal shards still give independent Adams."""
    b1, b2 = ADAM_BETAS
    step += active
    bc1 = 1 - b1 ** step.clamp_min(1)
    bc2_sqrt = torch.sqrt(1 - b2 ** step.clamp_min(1))
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        shape = (-1,) + (1,) * (p.dim() - 1)
        a = active.view(shape).to(p.dtype)
        m.mul_(1 - a * (1 - b1)).add_(a * (1 - b1) * g)
        v.mul_(1 - a * (1 - b2)).add_(a * (1 - b2) * g * g)
        denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(ADAM_EPS)
        p.sub_(a * (lr / bc1.view(shape)) * m / denom)


#: on CUDA, :func:`adam_step_uniform` runs PyTorch's fused Adam kernel (``torch.optim.Adam(fused=True)``'s
#: arithmetic: one pass over parameters, gradients and moments instead of seven foreach passes)
FUSED_ADAM_CUDA = True


def adam_step_uniform(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor],
                      exp_avg_sq: list[torch.Tensor], step: int, lr: float, *, fused: bool | None = None) -> None:
    """:func:`adam_step` when every client is active and all have taken ``step`` steps: the same
    arithmetic with scalar bias corrections, in a handful of foreach launches, or (``fused``; by default
    on CUDA) in one launch of ``torch._fused_adam_``, the kernel behind ``torch.optim.Adam(fused=True)``
    (the same update up to float rounding: tests/test_train.py)."""
    b1, b2 = ADAM_BETAS
    if fused is None:
        fused = FUSED_ADAM_CUDA and params[0].is_cuda
    if fused:  # the step count as a device scalar (a fill kernel, no host-device copy)
        step_t = torch.full((), float(step), dtype=torch.float32, device=params[0].device)
        grads = [g.contiguous() for g in grads]  # the kernel needs each gradient laid out as its parameter
        torch._fused_adam_(params, grads, exp_avg, exp_avg_sq, [], [step_t] * len(params), lr=lr, beta1=b1,
                           beta2=b2, weight_decay=0.0, eps=ADAM_EPS, amsgrad=False, maximize=False)
        return
    torch._foreach_lerp_(exp_avg, grads, 1 - b1)
    torch._foreach_mul_(exp_avg_sq, b2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - b2)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, math.sqrt(1 - b2 ** step))
    torch._foreach_add_(denom, ADAM_EPS)
    torch._foreach_addcdiv_(params, exp_avg, denom, value=-lr / (1 - b1 ** step))


_COMPILED: dict[tuple[int, int, int], object] = {}


def _compiled(fn, model: nn.Module, n: int, batch_size: int):  # noqa: ANN001, ANN202
    """torch.compile the per-step gradient function once per (model, n, batch) (CUDA graphs cut the
    launch overhead that dominates small models)."""
    key = (id(model), n, batch_size)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


_TWINS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _conv_twin(model: nn.Module, conv: str) -> nn.Module:
    """``model`` itself (``"cudnn"``) or its cached :func:`~robustfl.models.with_matmul_convs` twin."""
    if conv == "cudnn":
        return model
    if conv != "matmul":
        raise ValueError(f"conv must be 'cudnn', 'matmul' or one of {stacked.LAYOUTS}, got {conv!r}")
    from robustfl.models import with_matmul_convs

    twin = _TWINS.get(model)
    if twin is None:
        twin = _TWINS[model] = with_matmul_convs(model)
    return twin


#: what ``conv="auto"`` means on a CUDA device, per model class, in fp32: the fastest layout with CUDA
#: graphs for the paper's models. Session 4 measured grouped (fmnist) and channels-last (CIFAR-10,
#: Kather) fastest among cuDNN's layouts (bench/results/kern_*_h100.json); session 5's implicit-GEMM
#: Triton kernels, with their chosen tiles, beat both for every model at 10 and at 90/30 clients
#: (kern_triton_*_h200.json; with the first tiles fmnist at 10 clients had lost, kern_triton_tiles1_*).
AUTO_CUDA_CONV = {"FMNISTNet": "triton", "CIFARNet": "triton", "KatherNet": "triton"}
#: in bf16 (session 4: channels-last the fastest cuDNN layout; session 5: Triton faster still, except
#: CIFAR-10 at 10 clients, within 6%)
AUTO_CUDA_CONV_BF16 = "triton"


def triton_ready(model: nn.Module) -> bool:
    """Whether the ``triton`` layout can compute ``model``: Triton is installed and every convolution
    is one that :func:`robustfl.engine.triton_conv.supported` accepts."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or not stacked.supports(model):
        return False
    from robustfl.engine import triton_conv

    return all(triton_conv.supported(m) for _, m in stacked.layers(model) if isinstance(m, nn.Conv2d))


def resolve_kernels(model: nn.Module, device: torch.device, conv: str = "auto", cuda_graph: bool | None = None,
                    precision: str = "fp32") -> tuple[str, bool]:
    """The ``conv`` and ``cuda_graph`` arguments of :func:`train_vectorised` for a run's settings.
    ``conv="auto"``: on CUDA the layout of :data:`AUTO_CUDA_CONV` for the model's class (``"grouped"``
    for others; :data:`AUTO_CUDA_CONV_BF16` in bf16; ``"grouped"`` where that is ``"triton"`` and
    :func:`triton_ready` says no), on CPU or for a model :mod:`robustfl.engine.stacked` cannot compute vmap's
    ``"cudnn"``. ``cuda_graph=None`` turns graphs on wherever they apply (CUDA and a stacked layout)."""
    if conv == "auto":
        if device.type == "cuda" and stacked.supports(model):
            conv = AUTO_CUDA_CONV_BF16 if precision == "bf16" else AUTO_CUDA_CONV.get(type(model).__name__, "grouped")
            if conv == "triton" and not triton_ready(model):
                conv = "grouped"
        else:
            conv = "cudnn"
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and conv in stacked.LAYOUTS
    return conv, bool(cuda_graph)


#: a CUDA graph is captured only for a client count that at least this many steps of the call use
#: (capture costs about three eager steps: two warm-up calls and the capture)
GRAPH_MIN_STEPS = 8
#: keep a call's CUDA graphs, with the parameter and Adam-state buffers and the static inputs they were
#: captured on, for the next call of the same shapes, model, data tensors and kernel options (the next
#: round of a run): that call copies its starting models in and replays, without warm-up steps or
#: captures. At most this many sets are kept (least recently used dropped); 0 turns it off
GRAPH_CACHE_SIZE = 2


@dataclass
class _GraphSet:
    """CUDA graphs of :func:`train_vectorised`'s step per number of active clients, and the buffers
    they read and write."""

    net: nn.Module  # held, so that its id in the key is not reused
    params: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    graphs: dict[int, tuple]  # m -> (graph, static batch indices, static mask, static gradients)


_GRAPH_SETS: "collections.OrderedDict[tuple, _GraphSet]" = collections.OrderedDict()


def clear_graph_cache() -> None:
    """Drop the CUDA graphs kept between :func:`train_vectorised` calls (and their memory)."""
    _GRAPH_SETS.clear()


def _capture(fn, warmup: int = 2):  # noqa: ANN001, ANN202
    """Capture ``fn()`` (no host synchronisation, fixed shapes, inputs in static tensors) as a CUDA
    graph after ``warmup`` eager calls on a side stream (as torch.cuda.graph's documentation asks);
    returns the graph and the outputs that every ``graph.replay()`` rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# the run precisions (RunConfig.precision): ``fp32`` -- PyTorch's defaults on CUDA (convolutions in
# TF32, as cuDNN and the Triton kernels do by default, dense products in full FP32); ``tf32`` -- dense
# products in TF32 as well (TensorFlow's default on Ampere and later GPUs, and so the precision the
# paper's TensorFlow code gets on such a GPU); ``bf16`` -- autocast to bfloat16. On the CPU all three
# compute in FP32. Names: robustfl.config.PRECISIONS.


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
                     plan: BatchPlan | None = None, compile: bool = False, conv: str = "cudnn",
                     skip_idle: bool = True, cuda_graph: bool = False) -> torch.Tensor:
    """Train ``len(shards)`` clients from the global model at once; return their updates
    ``delta_i = w_i - theta`` as an ``(n, d)`` tensor (Section 3.1).

    ``theta`` is the global model ``(d,)``, or one starting model per client ``(n, d)`` (several
    simulations packed into one call, see :func:`robustfl.fl.simulate.simulate_many`). ``x`` holds the
    training inputs (uint8 NHWC or float NCHW) and ``y`` the labels, on the device; ``shards[i]`` are
    client i's indices into them. ``plan`` overrides the batch plan drawn from ``generator``.
    ``conv`` picks how the vmapped convolutions compute: ``"cudnn"`` (grouped convolution, one group
    per client; the default, measured faster on an H100, bench/README.md) or ``"matmul"`` (im2col +
    batched GEMM, :class:`robustfl.models.Conv2dMM`); both give the same function (tests/test_train.py).
    ``conv`` = ``"grouped"``, ``"channels_last"`` or ``"loop"`` computes the clients' forward pass
    explicitly instead of through vmap (:mod:`robustfl.engine.stacked`, with that convolution layout) and takes
    the gradients with one plain backward pass; ``cuda_graph`` (CUDA only, with those three) then
    captures that forward and backward as a CUDA graph and replays it, removing the per-kernel launch
    cost (the Adam step stays eager). One graph per number of clients computed: with idle clients
    skipped that number only falls during a call, so each graph is captured when its first step comes
    (if at least :data:`GRAPH_MIN_STEPS` steps will use it; shorter stretches run eagerly) and freed
    when the number falls.

    ``skip_idle``: clients whose batches have run out (unequal shards, packed runs of different sizes)
    are not computed. Clients are ordered by their number of batches, longest first, so that the active
    ones at any step are a prefix of the stacked parameters and each step trains views of that prefix;
    the updates are the same as with every client computed on masked batches (tests/test_train.py).
    Off under ``compile`` (a changing client count would recompile the step).
    """
    n = len(shards)
    d = theta.shape[-1]
    if n == 0:
        return theta.new_zeros(0, d)
    device = theta.device
    spec = ParamSpec(model)
    if plan is None:
        plan = batch_plan(shards, epochs, batch_size, generator)
    theta_n = theta.detach().expand(n, d) if theta.dim() == 1 else theta.detach()
    real = plan.mask.sum(2) > 0  # (n, steps): client i has a real sample at step s
    # steps where every client has a real sample: the common case, with one shared step count, takes
    # the foreach fast path; the masked per-client path starts at the first step where one idles
    # (padding only ever trails, see batch_plan). The same for any client order.
    all_active = real.all(0).tolist()
    order = n_active = None  # n_active: clients computed at each step, the prefix that still has batches
    if skip_idle and not compile:
        n_steps = torch.where(real.any(1), plan.steps - real.flip(1).int().argmax(1), 0)
        if bool((n_steps != n_steps[0]).any()):
            order = torch.argsort(n_steps, descending=True, stable=True)
            plan = BatchPlan(plan.idx[order], plan.mask[order])
            theta_n = theta_n[order.to(theta_n.device)]
            steps = torch.arange(plan.steps, device=n_steps.device)
            n_active = (n_steps[order].unsqueeze(1) > steps).sum(0).tolist()
    unflat = spec.unflatten(theta_n.contiguous())
    names = spec.names
    gset = None
    if cuda_graph and GRAPH_CACHE_SIZE > 0 and conv in stacked.LAYOUTS and device.type == "cuda":
        key = (id(model), conv, precision, n, batch_size, tuple(spec.shapes), x.data_ptr(), tuple(x.shape), x.dtype,
               y.data_ptr(), tuple(y.shape), str(device), torch.backends.cuda.matmul.allow_tf32,
               torch.backends.cudnn.allow_tf32, stacked.kernel_options())
        gset = _GRAPH_SETS.pop(key, None)
        if gset is None:
            gset = _GraphSet(model, [unflat[k].clone() for k in names], [torch.zeros_like(unflat[k]) for k in names],
                             [torch.zeros_like(unflat[k]) for k in names], {})
        else:  # the buffers the kept graphs read: this call's starting models, fresh Adam states
            for p, k in zip(gset.params, names):
                p.copy_(unflat[k])
            for t in gset.exp_avg + gset.exp_avg_sq:
                t.zero_()
        _GRAPH_SETS[key] = gset  # most recently used last
        while len(_GRAPH_SETS) > GRAPH_CACHE_SIZE:
            _GRAPH_SETS.popitem(last=False)
        params, exp_avg, exp_avg_sq = gset.params, gset.exp_avg, gset.exp_avg_sq
    else:
        params = [unflat[k].clone() for k in names]
        exp_avg = [torch.zeros_like(p) for p in params]
        exp_avg_sq = [torch.zeros_like(p) for p in params]
    step = torch.zeros(n, device=device)

    if conv in stacked.LAYOUTS:
        if compile:
            raise ValueError(f"compile applies to the vmap engine (conv 'cudnn' or 'matmul'), not conv={conv!r}")
        net = model

        def grad_all(p: tuple[torch.Tensor, ...], xb: torch.Tensor, yb: torch.Tensor,
                     mb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return stacked.stacked_grads(net, names, p, xb, yb, mb, layout=conv)
    else:
        if cuda_graph:
            raise ValueError(f"cuda_graph needs conv in {stacked.LAYOUTS}, got {conv!r}")
        net = _conv_twin(model, conv)

        def loss_one(p: tuple[torch.Tensor, ...], xb: torch.Tensor, yb: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
            out = functional_call(net, dict(zip(names, p)), (xb,))
            return masked_ce(out, yb, mb)

        grad_all = vmap(grad(loss_one), in_dims=(0, 0, 0, 0), randomness="different")
        if compile:
            grad_all = _compiled(grad_all, model, n, batch_size)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
    if conv == "triton" and device.type != "cuda":
        from robustfl.engine import triton_conv  # its kernels were compiled or interpreted as decided at import

        if not triton_conv.INTERPRET:
            raise ValueError(f"conv 'triton' needs a CUDA device (or TRITON_INTERPRET=1), got {device}")
    idx, mask = plan.idx.to(device), plan.mask.to(device)
    shape = x_shape_nchw(x)

    def grads_of(p_m: list[torch.Tensor], bi: torch.Tensor, mb: torch.Tensor) -> list[torch.Tensor]:
        xb = prepare_inputs(x[bi.reshape(-1)]).reshape(len(bi), batch_size, *shape)
        with precision_context(device, precision):
            return [g.float() for g in grad_all(tuple(p_m), xb, y[bi], mb)]

    graph = graph_m = None  # the CUDA graph in use and the number of clients it computes
    steps_with = collections.Counter([n] * plan.steps if n_active is None else n_active)
    k = 0
    masked_mode = False
    was_training = net.training
    net.train()
    try:
        for s in range(plan.steps):
            m = n if n_active is None else n_active[s]
            # the first m clients (all, unless idle ones are skipped): views, updated in place
            p_m, a_m, v_m = ((params, exp_avg, exp_avg_sq) if m == n else
                             ([t[:m] for t in params], [t[:m] for t in exp_avg], [t[:m] for t in exp_avg_sq]))
            mb = mask[:m, s]
            if cuda_graph and m != graph_m:  # the active prefix shrank (or the first step): new graph
                graph = graph_m = static_grads = None
                if gset is not None and m in gset.graphs:  # kept from an earlier call
                    graph, static_bi, static_mb, static_grads = gset.graphs[m]
                    graph_m = m
                elif steps_with[m] >= GRAPH_MIN_STEPS:
                    static_bi, static_mb = idx[:m, s].clone(), mb.clone()
                    graph, static_grads = _capture(
                        lambda p_m=p_m, bi=static_bi, mbs=static_mb: grads_of(p_m, bi, mbs))
                    graph_m = m
                    if gset is not None:
                        gset.graphs[m] = (graph, static_bi, static_mb, static_grads)
            if graph is not None:
                static_bi.copy_(idx[:m, s])
                static_mb.copy_(mb)
                graph.replay()
                grads = static_grads
            else:
                grads = grads_of(p_m, idx[:m, s], mb)
            if not masked_mode and all_active[s]:
                k += 1
                adam_step_uniform(p_m, grads, a_m, v_m, k, lr)
            else:
                if not masked_mode:
                    masked_mode = True
                    step.fill_(k)
                adam_step(p_m, grads, a_m, v_m, step[:m], (mb.sum(1) > 0).float(), lr)
    finally:
        net.train(was_training)
    out = spec.flatten(dict(zip(names, params))) - theta_n
    if order is not None:  # back to the callers' client order
        out = out[torch.argsort(order).to(out.device)]
    return out


def train_sequential(model: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     shards: Sequence[torch.Tensor], *, epochs: int, batch_size: int, lr: float,
                     generator: torch.Generator, precision: str = "fp32") -> torch.Tensor:
    """Reference engine: clients one after the other, each with its own ``torch.optim.Adam``.
    Same batches as :func:`train_vectorised` (same ``generator`` state -> same :func:`batch_plan`)."""
    from robustfl.params import load_flat_, model_to_flat

    device = theta.device
    plan = batch_plan(shards, epochs, batch_size, generator)
    out = []
    was_training = model.training
    for i in range(len(shards)):
        load_flat_(model, theta)
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
        out.append(model_to_flat(model) - theta)
    model.train(was_training)
    return torch.stack(out) if out else theta.new_zeros(0, theta.numel())


def x_shape_nchw(x: torch.Tensor) -> tuple[int, int, int]:
    """(C, H, W) of a batch of images stored as uint8 NHWC or float NCHW."""
    if x.dtype == torch.uint8:
        return (x.shape[3], x.shape[1], x.shape[2])
    return tuple(x.shape[1:])  # type: ignore[return-value]


def prepare_inputs(xb: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1]; float inputs pass through."""
    if xb.dtype == torch.uint8:
        return xb.permute(0, 3, 1, 2).float().div_(255.0)
    return xb


def train_single(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
                 lr: float, generator: torch.Generator) -> None:
    """Train ``model`` in place on (x, y) with Adam: the server's own training (FLARE's pre-training on
    the auxiliary set, Section 5.2; FLTrust's root-set update, Cao et al. 2021)."""
    from robustfl.params import load_flat_, model_to_flat

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
def stacked_plrs(model: nn.Module, flats: torch.Tensor, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
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
