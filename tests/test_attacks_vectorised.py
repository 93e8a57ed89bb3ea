"""The backdoor attackers' crafting for all attackers at once on a stacked layout (the loops of
robustfl.attacks.backdoor with ``layout``) against the same loops one attacker at a time through PyTorch's
layers, which tests/test_attacks_backdoor.py checks against the plain two-optimiser loop. CPU, scikit-learn's
digits, the digits CNN without dropout (so both draw nothing at random but the mini-batches, which
they draw alike); on a GPU also the paper's fmnist network through the Triton layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _digits import digits_tensors, seeded_digits_cnn
from robustfl.data import datasets as data
from robustfl.fl import experiment
from robustfl.attacks import ATTACKS
from robustfl.attacks import backdoor as bd
from robustfl.attacks.base import AttackContext
from robustfl.config import RunConfig
from robustfl.data.datasets import load_prepared
from robustfl.engine import EngineOptions
from robustfl.engine.adam import adam_rows
from robustfl.models import build_model
from robustfl.params import ParamSpec, model_to_flat
from robustfl.fl.simulate import Simulation

BATCH, TARGET = 32, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def setup():
    """Three attackers with shards of 250, 350 and 90 samples (8, 11 and 3 mini-batches an epoch, each
    epoch ending on a partial batch), a 10-image backdoor set, a benign mean update."""
    x, y = digits_tensors()
    model, theta = seeded_digits_cnn()
    shards = [torch.arange(0, 250), torch.arange(250, 600), torch.arange(600, 690)]
    src = (y[1000:] == 4).nonzero().squeeze(1)[:10] + 1000
    return {"model": model, "theta": theta, "x": x, "y": y, "shards": shards,
            "bd_x": x[src], "bd_y": torch.full((10,), TARGET), "ben": 1e-3 * torch.randn(5, theta.numel())}


def _engine(layout: str | None) -> EngineOptions:
    """The engine options of a run that trains with ``layout`` (None: the sequential engine)."""
    if layout is None:
        return EngineOptions(kind="sequential")
    return EngineOptions(kind="vectorised", conv=layout, cuda_graph=False)


def _ctx(s, layout, params=None, n=3, seed=5, **engine):
    return AttackContext(
        model=s["model"], global_flat=s["theta"], benign_updates=s["ben"], n_attackers=n, n_clients=n + 5, round=0,
        attacker_data=[(s["x"][sh], s["y"][sh]) for sh in s["shards"][:n]], backdoor_x=s["bd_x"],
        backdoor_y=s["bd_y"], batch_size=BATCH, params=dict(params or {}),
        generator=torch.Generator().manual_seed(seed), engine=_engine(layout).replace(**engine))


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert want.norm() > 1e-3
    for g, w in zip(got, want):  # every attacker's row, not just the stack
        assert ((g - w).norm() / w.norm()).item() < tol


@pytest.mark.parametrize("layout", ["grouped", "channels_last"])
@pytest.mark.parametrize("name,params", [
    ("krum_backdoor", {}),
    ("krum_backdoor", {"ls": 2, "mal_steps": 2, "order": "mal_first", "dist": "sq", "rho": 0.5, "boost": 4.0}),
    ("krum_backdoor", {"variant": "code", "self_epochs": 1}),
    ("krum_backdoor", {"stealth_ref": "self", "self_epochs": 1.5}),
    ("krum_backdoor", {"radius": 0.5, "start": "benign_mean"}),
    ("krum_backdoor", {"radius": 2.0, "project_at": "final", "boost_at": "final", "boost": 3.0}),
    ("median_backdoor", {"max_steps": 40, "tol": -1.0}),
    ("median_backdoor", {"max_steps": 200, "tol": 0.02}),
    ("median_backdoor", {"max_steps": 60, "tol": 0.05, "add_benign": True, "check_every": 7}),
])
def test_stacked_crafting_equals_one_attacker_at_a_time(setup, layout, name, params):
    """The registered attacks with a stacked layout in the context give every attacker the update the
    single-model loop gives it (same shards, generators and options; the shards differ in size)."""
    want = ATTACKS.get(name)(_ctx(setup, None, params))
    got = ATTACKS.get(name)(_ctx(setup, layout, params))
    assert got.shape == want.shape == (3, setup["theta"].numel())
    _close(got, want)


def test_fused_adam_rows_equal_the_stacked_adam_and_skip_inactive_rows():
    """adam_rows' fused kernel (one launch per row, an inactive row skipped through found_inf) against
    robustfl.engine.train.adam_step over 5 steps with rows switching off: the same weights and moments up to
    float rounding, an inactive row bit-identical to before, its NaN gradient never read."""
    torch.manual_seed(0)
    k, d = 3, 257
    start = [torch.randn(k, d), torch.zeros(k, d), torch.zeros(k, d), torch.zeros(k)]
    ref = [t.clone() for t in start]
    fus = [t.clone() for t in start]
    for s in range(5):
        g = torch.randn(k, d)
        active = torch.tensor([1.0, float(s < 3), float(s % 2)])
        g[active == 0] = float("nan")
        before = fus[0].clone()
        adam_rows(ref[0], g, ref[1], ref[2], ref[3], active, 1e-2, fused=False)
        adam_rows(fus[0], g, fus[1], fus[2], fus[3], active, 1e-2, fused=True)
        assert torch.equal(fus[0][active == 0], before[active == 0])
        for a, b in zip(ref, fus):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float rounding of two formulas
    assert torch.isfinite(fus[0]).all() and torch.equal(fus[3], torch.tensor([5.0, 3.0, 2.0]))


def test_explicit_boosting_many_stops_each_attacker_where_the_single_loop_does(setup):
    """Per-attacker stopping: the stacked loop reports the single loop's step count and loss for every
    attacker, also when they converge at different steps (different starting models here)."""
    s = setup
    spec = ParamSpec(s["model"])
    params = {k: v.clone() for k, v in spec.unflatten(s["theta"]).items()}
    params[[k for k in spec.names if k.endswith("bias")][-1]][TARGET] = 4.0  # a head start on the target
    kw = dict(boost=5.0, tol=0.02, max_steps=300, lr=1e-3)
    want = [bd.explicit_boosting(s["model"], th, s["bd_x"], s["bd_y"], generators=[torch.Generator().manual_seed(i)],
                                 **kw) for i, th in enumerate([s["theta"], spec.flatten(params)])]
    assert want[0][1][0]["steps"] != want[1][1][0]["steps"]
    for i, th in enumerate([s["theta"], spec.flatten(params)]):
        got, info = bd.explicit_boosting(s["model"], th, s["bd_x"], s["bd_y"], layout="grouped",
                                         generators=[torch.Generator().manual_seed(i)], **kw)
        _close(got, want[i][0])
        assert info[0]["steps"] == want[i][1][0]["steps"]
        assert info[0]["mal_loss"] == pytest.approx(want[i][1][0]["mal_loss"], rel=1e-4)


def test_an_attacker_certain_of_the_backdoor_label_skips_its_malicious_steps(setup):
    """Backdoor loss exactly 0 for the model: the stacked loop skips the boosted step on device, per row,
    as the single loop does; the result is honest training of the stealth objective."""
    s = setup
    spec = ParamSpec(s["model"])
    params = {k: v.clone() for k, v in spec.unflatten(s["theta"]).items()}
    params[[k for k in spec.names if k.endswith("bias")][-1]][TARGET] = 1e4
    theta = spec.flatten(params)
    owns = [(s["x"][sh], s["y"][sh]) for sh in s["shards"][:2]]
    kw = dict(boost=50.0, rho=0.0, mal_steps=2, iterations=3, batch_size=BATCH)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    got = bd.alternating_minimisation(s["model"], theta, owns, s["bd_x"], s["bd_y"], None, generators=gens(),
                                      layout="grouped", **kw)
    honest = bd.alternating_minimisation(s["model"], theta, owns, s["bd_x"], s["bd_y"], None,
                                         generators=gens(), layout="grouped", **{**kw, "mal_steps": 0})
    torch.testing.assert_close(got, honest, rtol=0, atol=0)
    want = bd.alternating_minimisation(s["model"], theta, owns, s["bd_x"], s["bd_y"], None, generators=gens(), **kw)
    _close(got, want)


@pytest.mark.parametrize("name", ["krum_backdoor", "median_backdoor"])
def test_stacked_attackers_read_only_their_own_shard(setup, name):
    """NaN in attacker 1's shard (and the template's parameters) leaves attacker 0's row bit-identical in
    the stacked computation; attacker 1's own row is poisoned where it trains on the shard."""
    s = setup
    clean = ATTACKS.get(name)(_ctx(s, "grouped", {"max_steps": 30}, n=2))
    ctx = _ctx(s, "grouped", {"max_steps": 30}, n=2)
    ctx.attacker_data[1] = (torch.full_like(ctx.attacker_data[1][0], float("nan")), ctx.attacker_data[1][1])
    model = build_model("digits_cnn", 10, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    ctx.model = model
    poisoned = ATTACKS.get(name)(ctx)
    assert torch.equal(poisoned[0], clean[0])
    if name == "median_backdoor":
        assert torch.equal(poisoned[1], clean[1])
    else:
        assert not torch.isfinite(poisoned[1]).all()


def test_deterministic_and_leaves_global_rng_alone(setup):
    state = torch.random.get_rng_state()
    a = ATTACKS.get("krum_backdoor")(_ctx(setup, "grouped", {"iterations": 3}, seed=11))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = ATTACKS.get("krum_backdoor")(_ctx(setup, "grouped", {"iterations": 3}, seed=11))
    c = ATTACKS.get("krum_backdoor")(_ctx(setup, "grouped", {"iterations": 3}, seed=12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_layout_and_switch(setup, monkeypatch):
    s = setup
    owns = [(s["x"][sh], s["y"][sh]) for sh in s["shards"][:2]]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(ValueError, match="layout"):
        bd.alternating_minimisation(s["model"], s["theta"], owns, s["bd_x"], s["bd_y"], None, boost=1.0, rho=0.0,
                                    generators=gens, layout="vmap")
    seen = []

    class Spy(bd.ModelRows):  # the layout of every ModelRows the loops build
        def __init__(self, *a, **k) -> None:
            seen.append(a[3])
            super().__init__(*a, **k)

    monkeypatch.setattr(bd, "ModelRows", Spy)
    # the switch: one attacker at a time even where the run trains with a stacked layout
    out = ATTACKS.get("krum_backdoor")(_ctx(setup, "grouped", {"iterations": 1}, stacked_attacks=False))
    assert out.shape[0] == 3 and seen == [None, None, None]
    seen.clear()
    ATTACKS.get("krum_backdoor")(_ctx(setup, "grouped", {"iterations": 1}))
    assert seen == ["grouped"]


def test_the_simulator_crafts_on_its_engine_layout(tmp_path: Path, monkeypatch):
    """A run on the vectorised engine with a stacked layout hands its engine options to the attack, which
    crafts with that layout; the sequential engine gives none."""
    prepared = data.prepare("digits", {}, tmp_path / "digits")
    seen = []
    real = bd.crafting_layout
    monkeypatch.setattr(bd, "crafting_layout", lambda ctx, **k: seen.append(real(ctx, **k)) or seen[-1])
    for engine, conv in (("vectorised", "grouped"), ("sequential", "auto")):
        cfg = RunConfig(dataset="digits", rounds=1, local_epochs=1, batch_size=32, engine={"kind": engine, "conv": conv},
                        attack="krum_backdoor", n_attackers=1, attack_params={"iterations": 2})
        part = tmp_path / f"{experiment.partition_key(cfg)}.npz"
        if not part.exists():
            experiment.build_partition(prepared, cfg, part)
        run_data, _ = experiment._setup(cfg, load_prepared(prepared), part, torch.device("cpu"), {})
        sim = Simulation(cfg, run_data, tmp_path / engine, None, torch.device("cpu"))
        sim.step(sim.train_benign(), 0.0)
    assert seen[0] == "grouped" and seen[-1] is None


def _gpu_case():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("fmnist_cnn", 10, 1, dropout=False).to(dev)
    theta = model_to_flat(model)
    owns = [(torch.randint(0, 256, (n, 28, 28, 1), dtype=torch.uint8, device=dev),
             torch.randint(0, 10, (n,), device=dev)) for n in (640, 300)]
    xb = torch.randint(0, 256, (100, 28, 28, 1), dtype=torch.uint8, device=dev)
    yb = torch.full((100,), TARGET, device=dev)
    return model, theta, owns, xb, yb


def _gpu_both(attack: str, layout: str, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model, theta, owns, xb, yb = _gpu_case()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    if attack == "alternating":
        got = bd.alternating_minimisation(model, theta, owns, xb, yb, None, generators=gens(), layout=layout, **kw)
        want = bd.alternating_minimisation(model, theta, owns, xb, yb, None, generators=gens(), **kw)
    else:
        got, _ = bd.explicit_boosting(model, theta, xb, yb, generators=gens(), layout=layout, **kw)
        want, _ = bd.explicit_boosting(model, theta, xb, yb, generators=gens(), **kw)
    return got, want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["grouped", "triton"])
@pytest.mark.parametrize("attack", ["alternating", "boosting"])
def test_stacked_crafting_matches_single_model_on_the_gpu_in_fp32(attack, layout):
    """The paper's fmnist network (dropout off), random fmnist-shaped shards of 640 and 300, two
    attackers, the whole loop (CUDA graphs, fused Adam): with TF32 off everywhere (the Triton
    convolutions then compute in IEEE FP32 too) the stacked crafting gives the single-model loops'
    updates up to float rounding, which Adam's first steps and the boosting amplify to ~1e-3. (With
    TF32 on, two runs differ as much as any two TF32 kernels let them: bench/results/attack_crafting_probe_h100.json.)"""
    from robustfl.engine.options import triton_ready

    if layout == "triton" and not triton_ready(build_model("fmnist_cnn", 10, 1)):
        pytest.skip("Triton is not installed")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        kw = (dict(boost=10.0, rho=1e-4, benign_epochs=1.0, batch_size=64) if attack == "alternating"
              else dict(boost=10.0, max_steps=40, tol=-1.0))
        got, want = _gpu_both(attack, layout, kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    _close(got, want, tol=1e-2)
