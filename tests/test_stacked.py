"""The explicit stacked forward pass (robustfl.engine.stacked) against vmap over the per-client models, and
the engine options built on it (``conv`` = grouped / channels_last / triton, ``cuda_graph``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from robustfl.engine import EngineOptions, masked_ce, stacked, triton_conv
from robustfl.engine.train import train_sequential, train_vectorised
from robustfl.models import build_model
from robustfl.params import ParamSpec, model_to_flat

MODELS = [("cifar10_cnn", (3, 32, 32)), ("kather_cnn", (3, 128, 128)), ("fmnist_cnn", (1, 28, 28)),
          ("digits_cnn", (1, 8, 8))]
CUDA = torch.cuda.is_available()
#: the layouts on CPU tensors; ``triton`` there runs in Triton's interpreter (conftest.py, no GPU)
CPU_LAYOUTS = [pytest.param(layout, marks=pytest.mark.skipif(
    layout == "triton" and not triton_conv.INTERPRET, reason="the triton layout on CPU tensors needs Triton's "
    "interpreter (TRITON_INTERPRET=1, set by conftest.py where there is no GPU)")) for layout in stacked.LAYOUTS]


def _stacked_params(model: nn.Module, n: int, dtype: torch.dtype = torch.float64,
                    device: str = "cpu") -> tuple[ParamSpec, list[torch.Tensor]]:
    spec = ParamSpec(model)
    flats = model_to_flat(model).to(device, dtype).unsqueeze(0)
    flats = flats + 0.01 * torch.randn(n, spec.dim, dtype=dtype, device=device)
    unflat = spec.unflatten(flats)
    return spec, [unflat[k] for k in spec.names]


@pytest.mark.parametrize("layout", CPU_LAYOUTS)
@pytest.mark.parametrize("name,shape", MODELS)
def test_stacked_gradients_equal_vmapped_per_client_gradients(name: str, shape: tuple[int, int, int],
                                                              layout: str) -> None:
    """float64, dropout off: the stacked forward + one backward gives each client exactly the gradient
    that vmap(grad(masked cross-entropy)) over its own model gives, including partly masked batches."""
    torch.manual_seed(2)
    model = build_model(name, 10, shape[0]).double().eval()
    spec, params = _stacked_params(model, 3)
    x = torch.rand(3, 4, *shape, dtype=torch.float64)
    y = torch.randint(0, 10, (3, 4))
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)

    def loss(p: tuple[torch.Tensor, ...], xb: torch.Tensor, yb: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        return masked_ce(functional_call(model, dict(zip(spec.names, p)), (xb,)), yb, mb)

    want = vmap(grad(loss))(tuple(params), x, y, mask)
    got = stacked.stacked_grads(model, spec.names, params, x, y, mask, layout=layout)
    assert len(got) == len(want)
    for a, b in zip(want, got):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    # and the logits themselves, client by client
    logits = stacked.stacked_logits(model, dict(zip(spec.names, params)), x, layout=layout)
    for i in range(3):
        ref = functional_call(model, {k: p[i] for k, p in zip(spec.names, params)}, (x[i],))
        torch.testing.assert_close(logits[i], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv", CPU_LAYOUTS)
@pytest.mark.parametrize("sizes", [[50, 50, 50, 50], [60, 35, 50, 17]])
def test_stacked_engine_equals_sequential(conv: str, sizes: list[int]) -> None:
    """Same batches, CPU: the stacked engine's updates equal the per-client torch.optim.Adam reference
    (equal shards: the foreach Adam; unequal: idle clients skipped and the masked Adam)."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    theta = model_to_flat(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (260, 8, 8, 1), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (260,), generator=g)
    starts = torch.tensor([0] + sizes).cumsum(0)
    shards = [torch.arange(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    kw = dict(epochs=2, batch_size=16, lr=1e-3)
    dv = train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(3),
                          options=EngineOptions(conv=conv), **kw)
    ds = train_sequential(model, theta, x, y, shards, generator=torch.Generator().manual_seed(3), **kw)
    assert ds.abs().max() > 1e-3
    torch.testing.assert_close(dv, ds, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize("layout", [p for p in CPU_LAYOUTS if p.values[0] in ("grouped", "triton")])
def test_stacked_dropout_draws_a_different_mask_per_client(layout: str) -> None:
    """vmap's randomness='different': identical clients on identical inputs must still get different
    dropout masks in training mode, and identical outputs in eval mode (the triton layout: the fused
    ReLU - Dropout - Flatten kernel's masks)."""
    torch.manual_seed(0)
    model = build_model("fmnist_cnn", 10, 1)  # dropout .25 and .5 (Table 6)
    spec = ParamSpec(model)
    flat = model_to_flat(model)
    params = spec.unflatten(flat.expand(2, -1).contiguous())
    x = torch.rand(1, 4, 1, 28, 28).expand(2, -1, -1, -1, -1)
    model.train()
    out = stacked.stacked_logits(model, params, x, layout=layout)
    assert not torch.allclose(out[0], out[1])
    model.eval()
    out = stacked.stacked_logits(model, params, x, layout=layout)
    torch.testing.assert_close(out[0], out[1])


def test_unsupported_models_and_options_are_refused() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
            self.head = nn.Linear(2 * 6 * 6, 10)

    assert not stacked.supports(Odd())
    with pytest.raises(NotImplementedError, match="BatchNorm2d"):
        stacked.layers(Odd())
    assert not stacked.supports(nn.Linear(3, 2))
    model = build_model("digits_cnn", 10, 1)
    assert stacked.supports(model)
    spec = ParamSpec(model)
    params = spec.unflatten(model_to_flat(model).expand(2, -1).contiguous())
    with pytest.raises(ValueError, match="layout must be"):
        stacked.stacked_logits(model, params, torch.rand(2, 3, 1, 8, 8), layout="nhwc")
    theta = model_to_flat(model)
    x = torch.randint(0, 256, (20, 8, 8, 1), dtype=torch.uint8)
    y = torch.randint(0, 10, (20,))
    shards = [torch.arange(0, 10), torch.arange(10, 20)]
    kw = dict(epochs=1, batch_size=5, lr=1e-3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        train_vectorised(model, theta, x, y, shards, options=EngineOptions(conv="grouped", cuda_graph=True), **kw)
    with pytest.raises(ValueError, match="'cuda_graph'"):
        EngineOptions(conv="vmap", cuda_graph=True)


def _cuda_case(sizes: list[int], name: str = "cifar10_cnn", hw: int = 32, ch: int = 3,  # noqa: ANN202
               **model_kw: object):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = build_model(name, 10, ch, **model_kw).to(dev)
    theta = model_to_flat(model)
    x = torch.randint(0, 256, (sum(sizes), hw, hw, ch), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (sum(sizes),), device=dev)
    starts = torch.tensor([0] + sizes).cumsum(0)
    shards = [torch.arange(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    def run(**kw: object) -> torch.Tensor:
        return train_vectorised(model, theta, x, y, shards, generator=torch.Generator().manual_seed(1), epochs=1,
                                batch_size=16, lr=1e-3, options=EngineOptions(**{"cuda_graph": False, **kw}))
    return run


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("sizes", [[64, 64, 64], [64, 40, 23]])
def test_cuda_graph_replays_the_eager_steps(sizes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU, dropout off: the captured-and-replayed step gives the eager step's updates (the same
    kernels; cuDNN's run-to-run nondeterminism aside), for equal and unequal shards (there one graph per
    shrinking number of active clients: graph_min_steps = 1 captures every one). One epoch: over more
    steps Adam amplifies even the eager path's run-to-run differences (measured 6e-4 after 8 steps of
    the vmap path against itself on an H100)."""
    run = _cuda_case(sizes)
    for conv in stacked.LAYOUTS:
        eager = run(conv=conv)
        graphed = run(conv=conv, cuda_graph=True, graph_min_steps=1)
        assert eager.abs().max() > 1e-3
        rel = ((graphed - eager).norm() / eager.norm()).item()
        assert rel < 1e-4, (conv, rel)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_layouts_agree_on_the_gpu_in_full_fp32() -> None:
    """With TF32 off for cuDNN, every stacked layout gives the vmap path's updates on the GPU, up to
    the float summation order that Adam amplifies (measured on an H100 after 4 steps: 1.2e-4 of the
    update norm for channels-last, 5e-6 between two vmap runs). With TF32 on, PyTorch's default for
    convolutions, channels-last and per-client convolutions differ by ~4e-2 (TF32 kernels; see
    docs/decisions/simulator.md, "TF32 in the stacked layouts' cuDNN convolutions"), so this bound tells the two apart."""
    run = _cuda_case([64, 64, 64])
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = run(conv="vmap")
        for conv in stacked.LAYOUTS:
            got = run(conv=conv, cuda_graph=True)
            rel = ((got - ref).norm() / ref.norm()).item()
            assert rel < 1e-3, (conv, rel)
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fmnist_triton_layout_agrees_on_the_gpu_in_full_fp32() -> None:
    """The fmnist network (Table 6) in the triton layout, whose 25,600-input dense layer runs its forward
    as robustfl.engine.triton_dense's split-K kernel, against the vmap path with TF32 off everywhere: the same
    updates up to summation order (the bound of the test above). Without dropout, whose masks the two
    engines draw differently."""
    run = _cuda_case([64, 48], "fmnist_cnn", 28, 1, dropout=False)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = run(conv="vmap")
        got = run(conv="triton", cuda_graph=True)
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < 1e-3, rel
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def test_auto_kernels_follow_the_measured_table() -> None:
    """``conv: auto`` (EngineOptions.resolve): the stacked layout measured fastest per model on CUDA with
    graphs on (the Triton kernels, fp32 and bf16), the vmap path on CPU; explicit choices pass through;
    a model with a convolution the Triton kernels do not compute falls back to grouped."""
    from robustfl.engine.options import AUTO_CUDA_CONV

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # resolving touches no device

    def resolve(model: nn.Module, device: torch.device, **kw: object) -> tuple[str, bool]:
        precision = kw.pop("precision", "fp32")
        o = EngineOptions(**kw).resolve(model, device, precision)
        return o.conv, o.cuda_graph

    for name, cls in [("fmnist_cnn", "FMNISTNet"), ("cifar10_cnn", "CIFARNet"), ("kather_cnn", "KatherNet")]:
        model = build_model(name, 10, 3)
        assert resolve(model, cuda) == (AUTO_CUDA_CONV[cls], True)
        assert resolve(model, cuda, precision="bf16") == ("triton", True)
        assert resolve(model, cpu) == ("vmap", False)
    assert AUTO_CUDA_CONV == {"FMNISTNet": "triton", "CIFARNet": "triton", "KatherNet": "triton"}
    strided = build_model("cifar10_cnn", 10, 3)
    strided.features[0].stride = (2, 2)
    assert resolve(strided, cuda, precision="bf16") == ("grouped", True)
    digits = build_model("digits_cnn", 10, 1)
    assert resolve(digits, cuda) == ("grouped", True)  # not in the table: grouped
    assert resolve(digits, cuda, conv="channels_last", cuda_graph=False) == ("channels_last", False)
    assert resolve(digits, cuda, conv="vmap") == ("vmap", False)  # vmap: no graphs

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
            self.head = nn.Linear(2 * 6 * 6, 10)

    assert resolve(Odd(), cuda) == ("vmap", False)  # unsupported by the stacked engine


def test_run_config_kernel_fields_are_validated_and_split_packs() -> None:
    from robustfl.config import RunConfig
    from robustfl.fl.experiment import cell_id, pack_key

    with pytest.raises(ValueError, match="'conv'"):
        RunConfig(engine={"conv": "winograd"})
    with pytest.raises(ValueError, match="'cuda_graph'"):
        RunConfig(engine={"conv": "vmap", "cuda_graph": True})
    with pytest.raises(ValueError, match="'cuda_graph'"):
        RunConfig(engine={"cuda_graph": "yes"})
    base = RunConfig(dataset="cifar10")
    assert cell_id(base) == "dataset=cifar10"  # defaults leave existing cell ids (and results) alone
    other = RunConfig(dataset="cifar10", engine={"conv": "channels_last"})
    assert cell_id(other) == "dataset=cifar10,conv=channelslast"
    assert pack_key(base) != pack_key(other)  # different kernels never share a training call


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["grouped", "triton"])
def test_dropout_inside_a_cuda_graph_draws_new_masks_every_replay(layout: str) -> None:
    """A captured step must not freeze its dropout masks: two replays on the same inputs give different
    training-mode outputs, clients differ within a replay, and eval mode gives equal outputs."""
    from robustfl.engine.graphs import capture as _capture

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = build_model("fmnist_cnn", 10, 1).to(dev)  # dropout .25 and .5 (Table 6)
    spec = ParamSpec(model)
    params = spec.unflatten(model_to_flat(model).expand(2, -1).contiguous())
    x = torch.rand(1, 8, 1, 28, 28, device=dev).expand(2, -1, -1, -1, -1).contiguous()
    model.train()
    graph, out = _capture(lambda: stacked.stacked_logits(model, params, x, layout=layout))
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.allclose(first, out)
    assert not torch.allclose(first[0], first[1])
    model.eval()
    graph, out = _capture(lambda: stacked.stacked_logits(model, params, x, layout=layout))
    graph.replay()
    torch.testing.assert_close(out[0], out[1])


def test_pool_before_relu_is_the_same_function_and_gradient_on_ties() -> None:
    """The stacked engine pools before the ReLU (robustfl.engine.stacked._pool_before_relu). On inputs full of
    ties (constant and all-negative windows, repeated positive maxima), logits and gradients still equal
    the model's own ReLU-then-pool order, client by client (float64)."""
    torch.manual_seed(3)
    model = build_model("cifar10_cnn", 10, 3).double().eval()
    names = [type(m).__name__ for _, m in stacked._pool_before_relu(stacked.layers(model))]
    assert names[:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    spec, params = _stacked_params(model, 2)
    x = torch.rand(2, 3, 3, 32, 32, dtype=torch.float64)
    x[:, :, :, :16] = 0.5  # constant regions: equal convolution outputs in a window (ties)
    x[1, 1] = 0.0
    y = torch.randint(0, 10, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.float64)

    def loss(p: tuple[torch.Tensor, ...], xb: torch.Tensor, yb: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        return masked_ce(functional_call(model, dict(zip(spec.names, p)), (xb,)), yb, mb)

    want = vmap(grad(loss))(tuple(params), x, y, mask)
    got = stacked.stacked_grads(model, spec.names, params, x, y, mask, layout="grouped")
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_gradients_equal_autograd_and_keep_the_weight_layout(with_bias: bool) -> None:
    """stacked.dense: per client x W^T + b, with autograd's values for every gradient (float64), and a
    weight gradient laid out like the weight (contiguous: the fused Adam kernel needs no copy of it)."""
    torch.manual_seed(4)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True) if with_bias else None
    dy = torch.randn(3, 5, 4, dtype=torch.float64)
    want_y = torch.stack([x[i] @ w[i].T + (b[i] if with_bias else 0) for i in range(3)])
    inputs = (x, w, b) if with_bias else (x, w)
    want = torch.autograd.grad(want_y, inputs, dy)
    y = stacked.dense(x, w, b)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(y, inputs, dy)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert got[1].is_contiguous()
    if with_bias:  # only the parameters asked for are computed
        (gw,) = torch.autograd.grad(stacked.dense(x.detach(), w, b), (w,), dy)
        torch.testing.assert_close(gw, want[1], rtol=1e-12, atol=1e-12)


def test_dense_under_autocast_returns_gradients_in_the_parameters_dtype() -> None:
    """Under (CPU) bf16 autocast, stacked.dense computes in bf16 like autocast's baddbmm and hands the
    float32 parameters float32 gradients close to the float32 ones."""
    torch.manual_seed(5)
    x = torch.randn(2, 8, 16)
    w = torch.randn(2, 4, 16, requires_grad=True)
    b = torch.randn(2, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = stacked.dense(x, w, b)
    assert y.dtype == torch.bfloat16
    gw, gb = torch.autograd.grad(y.float().sum(), (w, b))
    assert gw.dtype == gb.dtype == torch.float32
    rw, rb = torch.autograd.grad((x @ w.transpose(1, 2) + b.unsqueeze(1)).sum(), (w, b))
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gb, rb, rtol=1e-2, atol=1e-2)


def test_triton_layout_fuses_relu_and_2x2_pools_into_the_convolutions() -> None:
    """Which layers after each convolution the triton layout hands to the kernels' epilogue: the paper's
    networks' ReLU (fmnist) and 2x2 max-pool + ReLU (CIFAR-10, Kather, after _pool_before_relu), never
    another pool shape, a pool not followed by a ReLU, or a dropout before the ReLU."""
    def epilogues(model: nn.Module) -> list[str]:
        seq = stacked._pool_before_relu(stacked.layers(model))
        return [stacked._fusable(seq[i + 1:]) for i, (_, m) in enumerate(seq) if isinstance(m, nn.Conv2d)]

    # fmnist's second ReLU starts its ReLU - Dropout - Flatten run, which robustfl.engine.triton_flatten applies
    assert epilogues(build_model("fmnist_cnn", 10, 1)) == ["relu", "none"]
    assert epilogues(build_model("cifar10_cnn", 10, 3)) == ["pool_relu"] * 3
    assert epilogues(build_model("kather_cnn", 8, 3)) == ["pool_relu"] * 5

    class Net(nn.Module):
        def __init__(self, *after: nn.Module) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3), *after, nn.Flatten())
            self.head = nn.Linear(2, 2)

    assert epilogues(Net(nn.ReLU(), nn.MaxPool2d(3))) == ["none"]  # reordered to pool(3), ReLU: both stay
    assert epilogues(Net(nn.MaxPool2d(2, stride=1), nn.ReLU())) == ["none"]
    assert epilogues(Net(nn.MaxPool2d(2, padding=1), nn.ReLU())) == ["none"]
    assert epilogues(Net(nn.MaxPool2d(2, ceil_mode=True), nn.ReLU())) == ["none"]
    assert epilogues(Net(nn.MaxPool2d(2))) == ["none"]
    assert epilogues(Net(nn.Dropout(0.5), nn.ReLU())) == ["none"]
    assert epilogues(Net(nn.ReLU(), nn.MaxPool2d(2))) == ["pool_relu"]  # reordered to pool, ReLU


def test_flatten_runs_are_relu_dropout_flatten() -> None:
    """_flatten_run: [ReLU] [Dropout] Flatten with at least one of the first two; nothing else (a lone
    Flatten, a ReLU before a pool, a Dropout before the ReLU)."""
    relu, drop, flat, pool = nn.ReLU(), nn.Dropout(0.25), nn.Flatten(), nn.MaxPool2d(2)

    def run(*ms: nn.Module) -> tuple[bool, nn.Module | None, int]:
        return stacked._flatten_run([(str(i), m) for i, m in enumerate(ms)])

    assert run(relu, drop, flat, nn.Linear(2, 2)) == (True, drop, 3)
    assert run(relu, flat) == (True, None, 2)
    assert run(drop, flat) == (False, drop, 2)
    for ms in [(flat,), (relu,), (relu, drop), (relu, pool, flat), (drop, relu, flat), (relu, nn.Identity(), flat), ()]:
        assert run(*ms) == (False, None, 0), ms
