"""The backdoor suite (robustfl.attacks.backdoor_suite): model replacement (Bagdasaryan et al. 2020), DBA
(Xie et al. 2020) and Neurotoxin (Zhang et al. 2022).

Hand-worked answers for the scale gamma and the norm clip, Neurotoxin's mask and projection, DBA's split
of the data stage's trigger; the poisoned loop against the benign loop of robustfl.attacks.backdoor (no
poison: a benign client's training); the stacked crafting against one attacker at a time; and a packed
CPU simulation on digits with every attack, its metrics finite and its ASR recorded.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from robustfl.attacks import ATTACKS, is_targeted, required_backdoor
from robustfl.attacks import backdoor as bd
from robustfl.attacks import backdoor_suite as suite
from robustfl.attacks.base import AttackContext
from robustfl.config import RunConfig
from robustfl.data import datasets as data
from robustfl.data.serversets import split_trigger, stamp_trigger, trigger_mask
from robustfl.engine import EngineOptions
from robustfl.fl import experiment
from robustfl.models import build_model
from robustfl.params import model_to_flat

BATCH, TARGET, NAMES = 32, 3, ("model_replacement", "dba", "neurotoxin")
MEASURED: dict[str, float] = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def setup():
    """Digits (8x8), the digits CNN, three attackers with shards of 250, 350 and 90 samples, a trojan
    backdoor set (10 images of other classes stamped with the data stage's X trigger, labelled 3) and five
    benign updates."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    d = sklearn_datasets.load_digits()
    x8 = np.round(d.images / 16.0 * 255).astype(np.uint8)[..., None]  # uint8 NHWC, as the data stage stores
    x = torch.tensor(x8).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor(d.target, dtype=torch.int64)
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    theta = model_to_flat(model)
    src = ((y[1000:] != TARGET).nonzero().squeeze(1)[:10] + 1000).numpy()
    bd_x = torch.tensor(stamp_trigger(x8[src])).permute(0, 3, 1, 2).float() / 255.0
    g = torch.Generator().manual_seed(3)
    return {"model": model, "theta": theta, "x": x, "y": y, "bd_x": bd_x, "bd_y": torch.full((10,), TARGET),
            "shards": [torch.arange(0, 250), torch.arange(250, 600), torch.arange(600, 690)],
            "ben": 1e-3 * torch.randn(5, theta.numel(), generator=g), "sem_x": x[src]}


def _engine(layout):
    return EngineOptions(kind="sequential") if layout is None else EngineOptions(kind="vectorised", conv=layout,
                                                                                 cuda_graph=False)


def _ctx(s, params=None, n=3, layout=None, seed=5, bd_x=None, epochs=1):
    return AttackContext(
        model=s["model"], global_flat=s["theta"], benign_updates=s["ben"], n_attackers=n, n_clients=n + 5,
        round=1, attacker_data=[(s["x"][sh], s["y"][sh]) for sh in s["shards"][:n]],
        backdoor_x=s["bd_x"] if bd_x is None else bd_x, backdoor_y=s["bd_y"], batch_size=BATCH,
        local_epochs=epochs, params=dict(params or {}), generator=torch.Generator().manual_seed(seed),
        engine=_engine(layout))


def test_registered_as_targeted():
    for name in NAMES:
        assert name in ATTACKS and is_targeted(name)
    assert [required_backdoor(n) for n in NAMES] == [None, "trojan", None]


# ------------------------------------------------------------------------------------ model replacement
def test_replacement_gamma_is_n_over_eta_shared_by_the_attackers():
    assert suite.replacement_gamma(10, 1) == 10.0  # one attacker, eta = 1: gamma = n
    assert suite.replacement_gamma(10, 2) == 5.0  # two attackers share the replacement
    assert suite.replacement_gamma(6, 1, eta=2.0) == 3.0  # a server learning rate eta = 2
    with pytest.raises(ValueError):
        suite.replacement_gamma(6, 0)


def test_scale_and_clip_by_hand():
    deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    torch.testing.assert_close(suite.scale_and_clip(deltas, 2.0), torch.tensor([[6.0, 8.0], [0.6, 0.8]]))
    # bound S = 5: the first row (norm 10) is scaled down to norm 5, the second (norm 1) is left alone
    torch.testing.assert_close(suite.scale_and_clip(deltas, 2.0, 5.0), torch.tensor([[3.0, 4.0], [0.6, 0.8]]))


def test_model_replacement_scales_the_trained_update_by_gamma(setup):
    """Same generators: the default update is n/(eta k) = 7/(1*2) = 3.5 times the unscaled one (n = 5 benign +
    2 attackers); eta = 2 halves it; a bound S clips every row to norm S."""
    base = ATTACKS.get("model_replacement")(_ctx(setup, {"gamma": 1.0}, n=2))
    default = ATTACKS.get("model_replacement")(_ctx(setup, {}, n=2))
    eta2 = ATTACKS.get("model_replacement")(_ctx(setup, {"eta": 2.0}, n=2))
    torch.testing.assert_close(default, 3.5 * base)
    torch.testing.assert_close(eta2, 1.75 * base)
    s = 0.5 * float(base.norm(dim=1).min())
    clipped = ATTACKS.get("model_replacement")(_ctx(setup, {"bound": s}, n=2))
    torch.testing.assert_close(clipped.norm(dim=1), torch.full((2,), s))
    torch.testing.assert_close(clipped / clipped.norm(dim=1, keepdim=True), base / base.norm(dim=1, keepdim=True))


def test_anomaly_term_pulls_the_model_towards_its_anchor(setup):
    """alpha < 1 adds (1 - alpha) ||X - anchor||: the update is shorter than with alpha = 1 (anchor: the
    global model), and closer to the mean benign update with anomaly = benign_mean."""
    free = ATTACKS.get("model_replacement")(_ctx(setup, {"gamma": 1.0}, n=1, epochs=3))
    constrained = ATTACKS.get("model_replacement")(_ctx(setup, {"gamma": 1.0, "alpha": 0.5}, n=1, epochs=3))
    assert constrained.norm() < 0.8 * free.norm()
    mean = setup["ben"].mean(0)
    to_mean = ATTACKS.get("model_replacement")(_ctx(setup, {"gamma": 1.0, "alpha": 0.5, "anomaly": "benign_mean"},
                                                    n=1, epochs=3))
    assert (to_mean - mean).norm() < (constrained - mean).norm()


def test_without_poison_the_loop_is_a_benign_clients_training(setup):
    """poison_fraction 0 and alpha 1: poisoned_training is the honest local training of the alternating
    loop without malicious steps (robustfl.attacks.backdoor.benign_updates; same generators, same batches)."""
    s = setup
    owns = [(s["x"][sh], s["y"][sh]) for sh in s["shards"]]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    got = suite.poisoned_training(s["model"], s["theta"], owns, [s["bd_x"]] * 3, TARGET, generators=gens(),
                                  n_poison=0, epochs=1.5, lr=1e-3, batch_size=BATCH)
    want = bd.benign_updates(s["model"], s["theta"], owns, gens(), epochs=1.5, lr=1e-3, batch_size=BATCH)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_poisoned_batches_hold_c_backdoor_inputs(setup, monkeypatch):
    """Every batch of B = 32 has its first c = round(20/64 * 32) = 10 real samples from the pool (labelled
    the target), the rest from the shard; DBA's in-place pool entry is the batch's own sample stamped."""
    seen = []
    real = suite._poison_batches
    monkeypatch.setattr(suite, "_poison_batches", lambda *a, **k: seen.append((a, real(*a, **k))) or seen[-1][1])
    ATTACKS.get("model_replacement")(_ctx(setup, {}, n=1))
    (args, plan), = seen
    batches, _, sizes = args[0], args[1], args[2]
    assert suite.poisoned_per_batch(20 / 64, BATCH) == 10
    for (idx, mask), ((orig, _),) in zip(plan, batches):
        n_real = int(mask.sum())
        c = min(10, n_real)
        assert (idx[0, :c] >= sizes[0]).all() and (idx[0, c:n_real] < sizes[0]).all()
        assert torch.equal(idx[0, c:], orig[0, c:])
    seen.clear()
    ATTACKS.get("dba")(_ctx(setup, {}, n=1))
    (args, plan), = seen
    for (idx, _), ((orig, _),) in zip(plan, args[0]):
        assert torch.equal(idx[0, :10], orig[0, :10] + args[2][0])  # the same samples, from the stamped copy


# ------------------------------------------------------------------------------------------------- DBA
def test_split_trigger_parts_are_disjoint_and_cover_the_trigger():
    full = trigger_mask(8, 8)  # the X: (5,5) (5,7) (6,6) (7,5) (7,7)
    parts = split_trigger(full, 4)
    want = [[(5, 5), (5, 7)], [(6, 6)], [(7, 5)], [(7, 7)]]  # row-major pixels cut into runs of 2, 1, 1, 1
    assert [sorted(map(tuple, np.argwhere(p).tolist())) for p in parts] == want
    assert np.array_equal(np.logical_or.reduce(parts), full)
    assert sum(int(p.sum()) for p in parts) == int(full.sum())  # disjoint
    for n in (1, 5):
        ps = split_trigger(full, n)
        assert len(ps) == n and np.array_equal(np.logical_or.reduce(ps), full) and sum(p.sum() for p in ps) == 5
    for bad in (0, 6, True, 2.0):
        with pytest.raises(ValueError, match="n_parts"):
            split_trigger(full, bad)


def test_each_dba_attacker_poisons_with_its_own_local_trigger(setup, monkeypatch):
    """Attacker i's poisoned copies are its own shard with local trigger i mod 4 stamped (1.0) and nothing
    else changed; four attackers together carry the whole trigger."""
    seen = {}
    real = suite.poisoned_training
    monkeypatch.setattr(suite, "poisoned_training", lambda *a, **k: seen.update(a=a, k=k) or real(*a, **k))
    s = {**setup, "shards": [torch.arange(i * 100, i * 100 + 60) for i in range(4)]}
    out = ATTACKS.get("dba")(_ctx(s, {"epochs": 0.5}, n=4))
    assert out.shape == (4, s["theta"].numel()) and torch.isfinite(out).all()
    owns, pools = seen["a"][2], seen["a"][3]
    assert seen["k"]["in_place"] and seen["a"][4] == TARGET
    union = torch.zeros(8, 8, dtype=torch.bool)
    for i, ((x, _), p) in enumerate(zip(owns, pools)):
        changed = (p != x).any(0).any(0)  # pixels changed in some image
        part = suite.local_triggers(8, 8, 4)[i]
        assert not changed[~part].any() and (p[..., part] == 1.0).all()
        union |= part
    assert torch.equal(union, torch.from_numpy(trigger_mask(8, 8)))


def test_dba_needs_the_trojan_set(setup):
    with pytest.raises(ValueError, match="dba needs the trojan backdoor set"):
        ATTACKS.get("dba")(_ctx(setup, {}, n=1, bd_x=setup["sem_x"]))


# ------------------------------------------------------------------------------------------- Neurotoxin
def test_neurotoxin_mask_by_hand():
    v = torch.tensor([0.1, -5.0, 3.0, 0.0, 3.0, -0.2])
    # drop round(0.5 * 6) = 3 largest |v|: 5 (index 1), 3 (index 2), 3 (index 4)
    assert suite.neurotoxin_mask(v, 0.5).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert suite.neurotoxin_mask(torch.ones(4), 0.5).tolist() == [0.0, 0.0, 1.0, 1.0]  # ties: lower index first
    assert suite.neurotoxin_mask(v, 0.0).tolist() == [1.0] * 6
    rows = suite.neurotoxin_mask(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 0.34)  # round(1.02) = 1
    assert rows.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]


@pytest.mark.parametrize("mask_from", ["benign_mean", "own"])
def test_neurotoxin_changes_only_the_unmasked_coordinates(setup, mask_from):
    """With the top 30% of the benign direction excluded the update is exactly 0 there (the projection after
    every step), and those coordinates do move without the projection."""
    s = setup
    out = ATTACKS.get("neurotoxin")(_ctx(s, {"topk": 0.3, "mask_from": mask_from}, n=2))
    free = ATTACKS.get("neurotoxin")(_ctx(s, {"topk": 0.0}, n=2))
    if mask_from == "benign_mean":
        mask = suite.neurotoxin_mask(s["ben"].mean(0), 0.3).expand(2, -1)
    else:
        mask = torch.stack([suite.neurotoxin_mask(suite.shard_gradient(s["model"], s["theta"], s["x"][sh],
                                                                       s["y"][sh]), 0.3) for sh in s["shards"][:2]])
    dropped = mask == 0
    assert int(dropped[0].sum()) == round(0.3 * s["theta"].numel())
    assert (out[dropped] == 0).all()
    assert (out[~dropped] != 0).float().mean() > 0.5 and (free[dropped] != 0).float().mean() > 0.5


# ------------------------------------------------------------------------------------------ bad params
@pytest.mark.parametrize("name,params,match", [
    ("model_replacement", {"alphaa": 0.5}, r"model_replacement: unknown option\(s\) \['alphaa'\]"),
    ("model_replacement", {"alpha": 1.5}, "option 'alpha' must be a number in"),
    ("model_replacement", {"anomaly": "cosine"}, "option 'anomaly'"),
    ("model_replacement", {"gamma": -1}, "option 'gamma'"),
    ("model_replacement", {"bound": 0}, "option 'bound'"),
    ("dba", {"n_parts": 6}, r"option 'n_parts' must be an integer in 1..5"),
    ("dba", {"poison_fraction": 1.5}, "option 'poison_fraction'"),
    ("dba", {"scale": float("nan")}, "option 'scale'"),
    ("neurotoxin", {"topk": 1.0}, "option 'topk'"),
    ("neurotoxin", {"mask_from": "global"}, "option 'mask_from'"),
    ("neurotoxin", {"batch_size": 0}, "option 'batch_size'"),
])
def test_bad_options_raise_one_clear_error(setup, name, params, match):
    with pytest.raises(ValueError, match=match):
        ATTACKS.get(name)(_ctx(setup, params, n=1))


# ------------------------------------------------------------------------------------- stacked crafting
@pytest.mark.parametrize("layout", ["grouped", "channels_last"])
@pytest.mark.parametrize("name,params", [
    ("model_replacement", {"alpha": 0.7, "anomaly": "benign_mean"}),
    ("dba", {"epochs": 1.5}),
    ("neurotoxin", {"topk": 0.2}),
    ("neurotoxin", {"topk": 0.1, "mask_from": "own"}),
])
def test_stacked_crafting_equals_one_attacker_at_a_time(setup, layout, name, params, monkeypatch):
    """All three attackers at once on a stacked layout give every attacker the update the single-model loop
    gives it (shards of different sizes; the digits CNN has no dropout)."""
    seen = []

    class Spy(suite.ModelRows):  # the layout and row count of every ModelRows the loop builds
        def __init__(self, *a, **k) -> None:
            seen.append((a[1], a[3] if len(a) > 3 else k.get("layout")))
            super().__init__(*a, **k)

    monkeypatch.setattr(suite, "ModelRows", Spy)
    want = ATTACKS.get(name)(_ctx(setup, params, layout=None))
    assert [s for s in seen if s[1] is not None] == []
    seen.clear()
    got = ATTACKS.get(name)(_ctx(setup, params, layout=layout))
    assert (3, layout) in seen
    assert got.shape == want.shape == (3, setup["theta"].numel())
    for g, w in zip(got, want):
        assert w.norm() > 1e-3 and ((g - w).norm() / w.norm()).item() < 1e-5


def test_deterministic_and_leaves_global_rng_alone(setup):
    for name in NAMES:
        state = torch.random.get_rng_state()
        a = ATTACKS.get(name)(_ctx(setup, {}, n=2, seed=11))
        assert torch.equal(torch.random.get_rng_state(), state)
        assert torch.equal(a, ATTACKS.get(name)(_ctx(setup, {}, n=2, seed=11)))
        assert not torch.equal(a, ATTACKS.get(name)(_ctx(setup, {}, n=2, seed=12)))


# ------------------------------------------------------------------------------------------ simulation
def test_packed_simulation_with_every_attack(tmp_path: Path):
    """Two rounds on digits, the three attacks and an attack-free cell packed into one vectorised run (two
    attackers of ten, the trojan backdoor set): finite accuracy, loss and ASR in every round of every
    attacked cell; the ASRs are recorded. A DBA cell alone on the sequential engine (run_cell) ends finite too."""
    prepared = data.prepare("digits", {}, tmp_path / "digits")
    common = dict(dataset="digits", rounds=2, local_epochs=1, batch_size=32, backdoor="trojan",
                  backdoor_mode="multiple", seed=0)
    cfgs = [RunConfig(**common, engine={"kind": "vectorised"}, attack=a, n_attackers=2) for a in NAMES]
    cfgs.append(RunConfig(**common, engine={"kind": "vectorised"}))
    parts, outs = [], []
    for i, c in enumerate(cfgs):
        p = tmp_path / f"{experiment.partition_key(c)}.npz"
        if not p.exists():
            experiment.build_partition(prepared, c, p)
        parts.append(p)
        outs.append(tmp_path / "runs" / f"{i}")
    finals = experiment.run_cells(cfgs, prepared, parts, outs)
    assert all(f["engine"].startswith("vectorised-packed(4)") for f in finals)
    for c, o in zip(cfgs[:3], outs):
        rounds = pd.read_csv(o / "rounds.csv")
        assert len(rounds) == 2
        assert np.isfinite(rounds[["test_acc", "test_loss", "asr", "target_conf"]].to_numpy()).all()
        MEASURED.update({f"{c.attack}_asr_r{r}": a for r, a in zip(rounds["round"], rounds["asr"])})
    assert math.isnan(pd.read_csv(outs[3] / "rounds.csv")["asr"].iloc[-1])  # no attack: ASR not measured
    seq = RunConfig(**common, engine={"kind": "sequential"}, attack="dba", n_attackers=2)
    p = tmp_path / f"{experiment.partition_key(seq)}.npz"
    if not p.exists():
        experiment.build_partition(prepared, seq, p)
    final = experiment.run_cell(seq, prepared, p, tmp_path / "runs" / "seq")
    assert math.isfinite(final["asr"]) and math.isfinite(final["test_acc"])
    print("\nMEASURED", MEASURED)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["grouped", "triton"])
def test_stacked_poisoned_training_matches_single_model_on_the_gpu_in_fp32(layout):
    """The paper's fmnist network (dropout off), random fmnist-shaped shards of 640 and 300, two attackers,
    the whole loop (CUDA graph of the step, fused Adam, the anomaly term and a gradient mask): with TF32 off
    the stacked crafting gives the single-model loop's updates up to float rounding (amplified by Adam),
    and the masked coordinates stay exactly at theta."""
    from robustfl.engine.options import triton_ready

    if layout == "triton" and not triton_ready(build_model("fmnist_cnn", 10, 1)):
        pytest.skip("Triton is not installed")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("fmnist_cnn", 10, 1, dropout=False).to(dev)
    theta = model_to_flat(model)
    owns = [(torch.randint(0, 256, (n, 28, 28, 1), dtype=torch.uint8, device=dev),
             torch.randint(0, 10, (n,), device=dev)) for n in (640, 300)]
    pools = [torch.rand(100, 1, 28, 28, device=dev)] * 2
    mask = suite.neurotoxin_mask(torch.randn(theta.numel(), device=dev), 0.1)
    kw = dict(n_poison=20, epochs=1.0, lr=1e-3, batch_size=64, alpha=0.7, grad_mask=mask,
              engine=EngineOptions(kind="vectorised", conv=layout))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        got = suite.poisoned_training(model, theta, owns, pools, TARGET, generators=gens(), layout=layout, **kw)
        want = suite.poisoned_training(model, theta, owns, pools, TARGET, generators=gens(), **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    assert (got[:, mask == 0] == 0).all() and (want[:, mask == 0] == 0).all()
    for g, w in zip(got, want):
        assert w.norm() > 1e-3 and ((g - w).norm() / w.norm()).item() < 1e-2
