"""Local training: the vectorised engine equals the sequential per-client reference."""
from __future__ import annotations

import pytest
import torch

from robustfl.engine import EngineOptions, model_plrs
from robustfl.engine.adam import adam_step
from robustfl.engine.train import batch_plan, train_sequential, train_vectorised
from robustfl.models import build_model
from robustfl.params import ParamSpec, load_flat_, model_to_flat

NO_SKIP = EngineOptions(skip_idle=False)


def _data(n: int = 260, hw: int = 8, c: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, hw, hw, c), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _consecutive_shards(sizes: list[int]) -> list[torch.Tensor]:
    starts = torch.tensor([0] + sizes).cumsum(0)
    return [torch.arange(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("sizes", [[50, 50, 50, 50], [60, 35, 50, 17]])
def test_vectorised_equals_sequential(sizes: list[int]) -> None:
    """Same seed, CPU: both engines give the same updates, also for unequal shards (masked Adam)."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    theta = model_to_flat(model)
    x, y = _data()
    shards = _consecutive_shards(sizes)
    kw = dict(epochs=2, batch_size=16, lr=1e-3)
    dv = train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(3), **kw)
    ds = train_sequential(model, theta, x, y, shards, generator=torch.Generator().manual_seed(3), **kw)
    assert dv.shape == (len(shards), theta.numel())
    assert ds.abs().max() > 1e-3  # the clients really trained
    torch.testing.assert_close(dv, ds, rtol=1e-3, atol=2e-5)


def test_vectorised_equals_sequential_fmnist_shape_without_dropout() -> None:
    """The paper's fmnist network (Table 6), dropout off so that randomness is identical."""
    torch.manual_seed(1)
    model = build_model("fmnist_cnn", 10, 1, dropout=False)
    theta = model_to_flat(model)
    x, y = _data(n=24, hw=28)
    shards = [torch.arange(0, 12), torch.arange(12, 24)]
    kw = dict(epochs=1, batch_size=8, lr=1e-3)
    dv = train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0), **kw)
    ds = train_sequential(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0), **kw)
    # Adam's first steps are ~ lr * sign(g): where |g| is at float-noise level a coordinate may step the
    # other way, so compare in norm and bound the fraction of coordinates that differ by more than 1e-5.
    assert ds.norm() > 1e-2
    assert ((dv - ds).norm() / ds.norm()).item() < 1e-3
    assert ((dv - ds).abs() > 1e-5).float().mean().item() < 1e-4


def test_clients_are_independent() -> None:
    """A client's update depends only on its own shard: changing client 1's data leaves client 0's update."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    theta = model_to_flat(model)
    x, y = _data()
    shards = [torch.arange(0, 40), torch.arange(40, 80)]
    kw = dict(epochs=1, batch_size=8, lr=1e-3)
    a = train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0), **kw)
    x2 = x.clone()
    x2[40:80] = 255 - x2[40:80]
    b = train_vectorised(model, theta, x2, y, shards, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4


def test_adam_step_matches_torch_adam() -> None:
    """Stacked Adam with per-client activity equals torch.optim.Adam run per client."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, generator=g)
    grads = [torch.randn(3, 4, generator=g) for _ in range(4)]
    active = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0]), torch.ones(3), torch.tensor([0.0, 1.0, 1.0])]
    p = p0.clone()
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(3)
    for gr, a in zip(grads, active):
        adam_step([p], [gr], [m], [v], step, a, lr=0.01)
    for i in range(3):
        q = p0[i].clone().requires_grad_(True)
        opt = torch.optim.Adam([q], lr=0.01)
        for gr, a in zip(grads, active):
            if a[i] == 0:
                continue
            q.grad = gr[i].clone()
            opt.step()
        torch.testing.assert_close(p[i], q.detach())


def test_batch_plan_covers_each_shard_every_epoch() -> None:
    shards = [torch.arange(0, 10), torch.arange(10, 17)]
    plan = batch_plan(shards, epochs=2, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert plan.steps == 6  # 2 epochs x ceil(10/4)
    for i, s in enumerate(shards):
        real = plan.idx[i][plan.mask[i] > 0]
        assert sorted(real.tolist()) == sorted(s.tolist() * 2)


def _batch_plan_one_batch_at_a_time(shards, epochs, batch_size, generator):
    """batch_plan written one batch at a time: the reference."""
    per_client = []
    for shard in shards:
        batches = []
        for _ in range(epochs):
            perm = shard[torch.randperm(len(shard), generator=generator)]
            batches += list(torch.split(perm, batch_size))
        per_client.append(batches)
    steps = max(len(b) for b in per_client)
    idx = torch.zeros(len(shards), steps, batch_size, dtype=torch.long)
    mask = torch.zeros(len(shards), steps, batch_size)
    for i, batches in enumerate(per_client):
        for s, b in enumerate(batches):
            idx[i, s, : len(b)] = b
            mask[i, s, : len(b)] = 1.0
    return idx, mask


@pytest.mark.parametrize("sizes", [[10, 7], [0, 5, 64, 63, 65, 1], [0, 0], [128, 3]])
@pytest.mark.parametrize("epochs", [1, 3])
def test_batch_plan_equals_the_batch_at_a_time_plan(sizes: list[int], epochs: int) -> None:
    """The whole-tensor batch_plan draws the same permutations in the same order and lays them out as
    the batch-at-a-time loop did: the same indices and masks, partial and empty shards included, and
    the generator left in the same state."""
    start = 0
    shards = []
    for n in sizes:
        shards.append(torch.arange(start, start + n) * 3)
        start += n
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plan = batch_plan(shards, epochs=epochs, batch_size=64 if max(sizes) > 20 else 4, generator=g1)
    idx, mask = _batch_plan_one_batch_at_a_time(shards, epochs, 64 if max(sizes) > 20 else 4, g2)
    assert torch.equal(plan.idx, idx) and torch.equal(plan.mask, mask)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_model_plrs_match_per_model_features() -> None:
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    theta = model_to_flat(model)
    flats = theta + 0.05 * torch.randn(3, theta.numel())
    x, _ = _data(n=7)
    plrs = model_plrs(model, flats, x)
    assert plrs.shape == (3, 7, model.plr_dim)
    for i in range(3):
        load_flat_(model, flats[i])
        model.eval()
        ref = model.plr(x.permute(0, 3, 1, 2).float() / 255)
        torch.testing.assert_close(plrs[i], ref, rtol=1e-4, atol=1e-5)
    assert ParamSpec(model).dim == theta.numel()


@pytest.mark.parametrize("fused", [False, True])
def test_uniform_adam_fast_path_equals_masked_step(fused: bool) -> None:
    """The fast path (all clients active), foreach or PyTorch's fused Adam kernel (what CUDA runs),
    computes the same Adam as the per-client masked step."""
    from robustfl.engine.adam import adam_step_uniform

    g = torch.Generator().manual_seed(1)
    p0 = [torch.randn(4, 3, 2, generator=g), torch.randn(4, 5, generator=g)]
    pa = [t.clone() for t in p0]
    pb = [t.clone() for t in p0]
    ma, va = [torch.zeros_like(t) for t in p0], [torch.zeros_like(t) for t in p0]
    mb, vb = [torch.zeros_like(t) for t in p0], [torch.zeros_like(t) for t in p0]
    step = torch.zeros(4)
    for k in range(1, 6):
        grads = [torch.randn(t.shape, generator=g) for t in p0]
        grads[0] = grads[0].transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous gradient (bmm's)
        adam_step(pa, grads, ma, va, step, torch.ones(4), lr=0.01)
        adam_step_uniform(pb, grads, mb, vb, k, lr=0.01, fused=fused)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b)
    for a, b in zip(ma + va, mb + vb):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(pa[0], p0[0])


@pytest.mark.parametrize("sizes", [[17, 60, 35, 50], [20, 80, 20, 20]])
def test_skipping_idle_clients_gives_the_same_updates(sizes: list[int]) -> None:
    """Unequal shards: training only the clients that still have batches (longest first, a prefix of
    the stacked parameters) equals computing every client on masked batches, in the callers' order."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    theta = model_to_flat(model)
    x, y = _data()
    shards = _consecutive_shards(sizes)
    kw = dict(epochs=2, batch_size=10, lr=1e-3)
    skip = train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(3), **kw)
    full = train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(3),
                            options=NO_SKIP, **kw)
    assert full.abs().max() > 1e-3
    torch.testing.assert_close(skip, full, rtol=1e-5, atol=1e-7)
    # per-client starting models (packed simulations) are permuted with their clients
    thetas = theta + 0.01 * torch.randn(len(shards), theta.numel())
    skip = train_vectorised(model, thetas, x, y, shards, generator=torch.Generator().manual_seed(3), **kw)
    full = train_vectorised(model, thetas, x, y, shards, generator=torch.Generator().manual_seed(3),
                            options=NO_SKIP, **kw)
    torch.testing.assert_close(skip, full, rtol=1e-5, atol=1e-7)


def test_idle_clients_cost_no_flops() -> None:
    """One long shard and three short ones: 28 real client-steps of 64 padded ones; skipping the idle
    clients must cut the counted FLOPs accordingly (conv/matmul FLOPs scale with the clients computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    theta = model_to_flat(model)
    x, y = _data(n=140)
    shards = _consecutive_shards([20, 80, 20, 20])
    kw = dict(epochs=2, batch_size=10, lr=1e-3)
    flops = {}
    for skip in (True, False):
        with FlopCounterMode(display=False) as fc:
            train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(3),
                             options=EngineOptions(skip_idle=skip), **kw)
        flops[skip] = fc.get_total_flops()
    assert flops[False] > 0
    assert flops[True] <= (28 / 64 + 0.02) * flops[False]


def test_precision_context_switches_tf32_for_cuda_steps_and_restores_it() -> None:
    """precision 'tf32' turns TF32 on for dense products (and convolutions) on CUDA inside the block and
    restores both switches after it, also after an error; 'fp32' and the CPU leave them alone; the
    backward-only form (autocast=False) keeps TF32 and drops bf16 autocast; unknown names are refused."""
    from robustfl.engine.options import PRECISIONS
    from robustfl.engine.train import precision_context

    assert PRECISIONS == ("fp32", "tf32", "bf16")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # no CUDA call is made for the TF32 switches
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        for autocast in (True, False):
            with precision_context(cuda, "tf32", autocast=autocast):
                assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        with pytest.raises(RuntimeError, match="inside"):
            with precision_context(cuda, "tf32"):
                raise RuntimeError("inside")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        for dev, prec in ((cuda, "fp32"), (cpu, "tf32"), (cpu, "bf16"), (cuda, "bf16")):
            with precision_context(dev, prec, autocast=False):
                assert not torch.backends.cuda.matmul.allow_tf32
                assert not torch.is_autocast_enabled("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    with pytest.raises(ValueError, match="precision must be one of"):
        with precision_context(cpu, "fp16"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tf32_steps_on_the_gpu_stay_close_to_fp32() -> None:
    """One vectorised round of the fmnist model on the GPU in 'tf32' against 'fp32' (same batches): the
    updates differ by TF32's rounding only (relative difference under 5 %: Adam's first steps are
    nearly sign(g), so a gradient component near zero may flip), and not at all in
    'fp32' twice."""
    from robustfl.models import build_model
    from robustfl.params import model_to_flat

    torch.manual_seed(0)
    model = build_model("fmnist_cnn", 10, 1).cuda()
    theta = model_to_flat(model)
    x = torch.randint(0, 256, (256, 28, 28, 1), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 10, (256,), device="cuda")
    shards = [torch.arange(i * 64, (i + 1) * 64) for i in range(4)]
    def run(precision: str) -> torch.Tensor:
        torch.manual_seed(2)  # the same dropout masks
        return train_vectorised(model, theta, x, y, shards, epochs=1, batch_size=32, lr=1e-3,
                                generator=torch.Generator().manual_seed(1), precision=precision,
                                options=EngineOptions(conv="triton", cuda_graph=False))

    a, b, c = run("fp32"), run("fp32"), run("tf32")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    rel = ((c - a).norm() / a.norm()).item()
    assert 0 < rel < 5e-2, rel


def test_engine_options_are_immutable_validated_and_resolved() -> None:
    """EngineOptions: frozen and hashable (the key of CUDA graphs kept between calls), invalid values
    refused naming the option, ``auto`` resolved per device; train_clients picks the engine by kind."""
    import dataclasses

    from robustfl.engine import train_clients

    opts = EngineOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.conv = "grouped"  # type: ignore[misc]
    assert hash(opts) == hash(EngineOptions()) and opts != opts.replace(graph_cache=0)
    for bad, key in (({"kind": "fast"}, "kind"), ({"conv": "cudnn"}, "conv"), ({"conv": "matmul"}, "conv"),
                     ({"conv": "loop"}, "conv"), ({"cuda_graph": "yes"}, "cuda_graph"),
                     ({"conv": "vmap", "cuda_graph": True}, "cuda_graph"), ({"graph_cache": -1}, "graph_cache"),
                     ({"skip_idle": 1}, "skip_idle")):
        with pytest.raises(ValueError, match=repr(key)):
            EngineOptions(**bad)
    model = build_model("digits_cnn", 10, 1)
    cpu = opts.resolve(model, torch.device("cpu"))
    assert (cpu.kind, cpu.conv, cpu.cuda_graph, cpu.layout) == ("sequential", "vmap", False, None)
    gpu = opts.resolve(model, torch.device("cuda"))  # resolving touches no device
    assert (gpu.kind, gpu.conv, gpu.cuda_graph, gpu.layout) == ("vectorised", "grouped", True, "grouped")
    assert EngineOptions(kind="vectorised", conv="grouped").resolve(model, torch.device("cpu")).layout == "grouped"
    theta = model_to_flat(model)
    x, y = _data(n=40)
    shards = [torch.arange(0, 20), torch.arange(20, 40)]
    kw = dict(epochs=1, batch_size=8, lr=1e-3)
    seq = train_clients(model, theta, x, y, shards, options=EngineOptions(), generator=torch.Generator().manual_seed(0),
                        **kw)
    want = train_sequential(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(seq, want)
    vec = train_clients(model, theta, x, y, shards, options=EngineOptions(kind="vectorised"),
                        generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(vec, train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0),
                                             **kw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_kept_between_calls_give_each_calls_own_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_vectorised keeps its CUDA graph for the next call of the same shapes and options
    (EngineOptions.graph_cache): a second call from another starting model, on other batches, replays it
    without a new capture and returns that call's own updates (those of a call with nothing kept: the
    same kernels, bit for bit); other options capture anew."""
    from robustfl.engine import train

    captures = []
    real = train.capture
    monkeypatch.setattr(train, "capture", lambda fn, *a, **k: captures.append(1) or real(fn, *a, **k))
    train.clear_graph_cache()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("fmnist_cnn", 10, 1, dropout=False).to(dev)
    theta = model_to_flat(model)
    x = torch.randint(0, 256, (3 * 640, 28, 28, 1), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (3 * 640,), device=dev)
    shards = [torch.arange(i * 640, (i + 1) * 640, device=dev) for i in range(3)]
    opts = EngineOptions(conv="triton", cuda_graph=True)
    kw = dict(epochs=1, batch_size=64, lr=1e-3)
    thetas = [theta, theta + 0.01 * torch.randn_like(theta)]
    kept = [train_vectorised(model, th, x, y, shards, generator=torch.Generator().manual_seed(i), options=opts, **kw)
            for i, th in enumerate(thetas)]
    assert len(captures) == 1 and len(train._GRAPH_SETS) == 1
    fresh = [train_vectorised(model, th, x, y, shards, generator=torch.Generator().manual_seed(i),
                              options=opts.replace(graph_cache=0), **kw) for i, th in enumerate(thetas)]
    assert len(captures) == 3
    for a, b in zip(kept, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(kept[0], kept[1])
    train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(0),
                     options=opts.replace(graph_min_steps=4), **kw)  # other options: another key
    assert len(captures) == 4 and len(train._GRAPH_SETS) == 2
    train.clear_graph_cache()
