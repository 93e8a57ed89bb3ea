"""Backdoor attacks of Bhagoji et al. (krum_backdoor, median_backdoor) and FLARE's adaptive attack.

All on scikit-learn's 8x8 digits with the small digits CNN, CPU only. Every claim is measured:
ASR under FedAvg against a no-attack run, the boosting equation, the distance term, the PLR term, and
what the attackers read.
"""
from __future__ import annotations

import pytest
import torch

from _digits import digits_tensors
from robustfl.attacks import ATTACKS, is_targeted
from robustfl.attacks import adaptive, backdoor  # noqa: F401  (registers the attacks)
from robustfl.attacks.adaptive import d_plr
from robustfl.attacks.base import AttackContext
from robustfl.engine import EngineOptions
from robustfl.engine import model_forward as forward_with
from robustfl.models import build_model
from robustfl.params import ParamSpec, model_to_flat


def alternating_minimisation(model, theta, x_own, y_own, x_bd, y_bd, ref, *, generator, **kw):
    """One attacker's update ``(d,)``: robustfl.attacks.backdoor.alternating_minimisation with k = 1."""
    return backdoor.alternating_minimisation(model, theta, [(x_own, y_own)], x_bd, y_bd, ref, generators=[generator],
                                             **kw)[0]


def benign_update(model, theta, x_own, y_own, *, generator, **kw):
    return backdoor.benign_updates(model, theta, [(x_own, y_own)], [generator], **kw)[0]


def explicit_boosting(model, theta, x_bd, y_bd, *, generator, **kw):
    deltas, infos = backdoor.explicit_boosting(model, theta, x_bd, y_bd, generators=[generator], **kw)
    return deltas[0], infos[0]


N_BEN, N_CLIENTS, SOURCE, TARGET, BATCH = 5, 6, 4, 3, 32
MEASURED: dict[str, float] = {}  # printed at the end (pytest -s) for the record


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def digits():
    x, y = digits_tensors()  # (N, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    test_x, test_y, train_x, train_y = x[:300], y[:300], x[300:], y[300:]
    shards = list(torch.arange(len(train_y)).chunk(N_CLIENTS))  # the last shard is the attacker's
    # backdoor set: 10 held-out digits of class 4 relabelled to 3 (semantic, "multiple" targets)
    src = (test_y == SOURCE).nonzero().squeeze(1)[:10]
    return {
        "train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "shards": shards,
        "bd_x": test_x[src].clone(), "bd_y": torch.full((len(src),), TARGET, dtype=torch.int64),
    }


def _model():
    torch.manual_seed(0)
    return build_model("digits_cnn", 10, 1)


@torch.no_grad()
def _predict(model, flat, x):
    return forward_with(model, ParamSpec(model).unflatten(flat), x)[1].argmax(1)


def _ctx(model, theta, benign, data, attacker_shards, params=None, seed=7, local_epochs=1):
    return AttackContext(
        model=model, global_flat=theta, benign_updates=benign, n_attackers=len(attacker_shards),
        n_clients=N_BEN + len(attacker_shards), round=0,
        attacker_data=[(data["train_x"][s], data["train_y"][s]) for s in attacker_shards],
        backdoor_x=data["bd_x"], backdoor_y=data["bd_y"], lr=1e-3, local_epochs=local_epochs,
        batch_size=BATCH, num_classes=10, params=dict(params or {}),
        generator=torch.Generator().manual_seed(seed))


def _benign(model, theta, data, seed=1, epochs=1):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([benign_update(model, theta, data["train_x"][s], data["train_y"][s], epochs=epochs,
                                      lr=1e-3, batch_size=BATCH, generator=g) for s in data["shards"][:N_BEN]])


def _fedavg_run(data, attack: str | None, rounds: int = 4):
    """Plain FedAvg: 5 benign clients (Adam, 1 epoch) + 1 client that is honest or runs ``attack``."""
    model = _model()
    theta = model_to_flat(model)
    g = torch.Generator().manual_seed(1)
    att_shard = data["shards"][-1]
    for r in range(rounds):
        ben = torch.stack([benign_update(model, theta, data["train_x"][s], data["train_y"][s], epochs=1,
                                         lr=1e-3, batch_size=BATCH, generator=g) for s in data["shards"][:N_BEN]])
        if attack is None:
            last = benign_update(model, theta, data["train_x"][att_shard], data["train_y"][att_shard], epochs=1,
                                 lr=1e-3, batch_size=BATCH, generator=g)[None]
        else:
            ctx = _ctx(model, theta, ben, data, [att_shard], seed=100 + r)
            last = ATTACKS.get(attack)(ctx)
            assert last.shape == (1, theta.numel()) and torch.isfinite(last).all()
        theta = theta + torch.cat([ben, last]).mean(0)
    asr = (_predict(model, theta, data["bd_x"]) == TARGET).float().mean().item()
    acc = (_predict(model, theta, data["test_x"]) == data["test_y"]).float().mean().item()
    return asr, acc


# ------------------------------------------------------------------------------------------ registry
def test_registered_as_targeted():
    for name in ("krum_backdoor", "median_backdoor", "adaptive_plr"):
        assert name in ATTACKS and is_targeted(name)


def test_unknown_option_and_variant_rejected(digits):
    model = _model()
    theta = model_to_flat(model)
    ben = torch.zeros(N_BEN, theta.numel())
    with pytest.raises(ValueError, match="unknown backdoor attack option"):
        ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]], {"rhoo": 1.0}))
    with pytest.raises(ValueError, match="unknown variant"):
        ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]], {"variant": "x"}))


# ------------------------------------------------------------------------------- ASR under FedAvg
def test_krum_backdoor_raises_asr_under_fedavg(digits):
    asr_none, acc_none = _fedavg_run(digits, None)
    asr_att, acc_att = _fedavg_run(digits, "krum_backdoor")
    MEASURED.update(fedavg_asr_none=asr_none, fedavg_acc_none=acc_none,
                    fedavg_asr_krum_backdoor=asr_att, fedavg_acc_krum_backdoor=acc_att)
    assert asr_none <= 0.2
    assert asr_att >= asr_none + 0.5, (asr_att, asr_none)


def test_median_backdoor_raises_asr_under_fedavg(digits):
    asr_none, _ = _fedavg_run(digits, None, rounds=2)
    asr_att, acc_att = _fedavg_run(digits, "median_backdoor", rounds=2)
    MEASURED.update(fedavg_asr_median_backdoor=asr_att, fedavg_acc_median_backdoor=acc_att)
    assert asr_att >= asr_none + 0.5, (asr_att, asr_none)


# ------------------------------------------------------------------------------- boosting equation
def test_alternation_is_affine_in_boost(digits):
    """One alternation: w = w_ben + boost * (w' - w_ben), with w_ben (the stealth steps) and the
    malicious step w' - w_ben independent of boost -> delta(b) = delta(0) + b * m exactly."""
    model = _model()
    theta = model_to_flat(model)
    s = digits["shards"][-1]
    ref = _benign(model, theta, digits).mean(0)

    def run(boost, mal_steps=1):
        return alternating_minimisation(
            model, theta, digits["train_x"][s], digits["train_y"][s], digits["bd_x"], digits["bd_y"], ref,
            boost=boost, rho=1e-4, ls=3, mal_steps=mal_steps, iterations=1, batch_size=BATCH,
            generator=torch.Generator().manual_seed(3))

    d0, d1, d2, d5 = run(0.0), run(1.0), run(2.0), run(5.0)
    benign_only = run(7.0, mal_steps=0)
    m = d1 - d0
    assert m.norm() > 1e-3  # the malicious step is not empty
    assert torch.equal(d0, benign_only)  # boost 0 removes exactly the malicious component
    torch.testing.assert_close(d2 - d0, 2 * m, atol=1e-6, rtol=1e-4)  # doubling boost doubles it
    torch.testing.assert_close(d5 - d0, 5 * m, atol=1e-6, rtol=1e-4)


def test_boost_zero_is_honest_training_over_many_iterations(digits):
    model = _model()
    theta = model_to_flat(model)
    s = digits["shards"][-1]
    kw = dict(rho=0.0, benign_epochs=2, batch_size=BATCH)
    a = alternating_minimisation(model, theta, digits["train_x"][s], digits["train_y"][s], digits["bd_x"],
                                 digits["bd_y"], None, boost=0.0, generator=torch.Generator().manual_seed(4), **kw)
    b = alternating_minimisation(model, theta, digits["train_x"][s], digits["train_y"][s], digits["bd_x"],
                                 digits["bd_y"], None, boost=0.0, mal_steps=0,
                                 generator=torch.Generator().manual_seed(4), **kw)
    c = alternating_minimisation(model, theta, digits["train_x"][s], digits["train_y"][s], digits["bd_x"],
                                 digits["bd_y"], None, boost=10.0, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b)
    assert (c - a).norm() > 10 * (a.norm() * 1e-3)


def test_boost_default_is_number_of_clients(digits):
    model = _model()
    theta = model_to_flat(model)
    ben = _benign(model, theta, digits)
    shard = [digits["shards"][-1]]
    opts = {"iterations": 2}
    default = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, shard, opts))
    n = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, shard, {**opts, "boost": N_CLIENTS}))
    other = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, shard, {**opts, "boost": 2}))
    assert torch.equal(default, n)
    assert not torch.allclose(default, other)


def test_explicit_boosting_scales_linearly_and_converges(digits):
    model = _model()
    theta = model_to_flat(model)
    kw = dict(min_steps=2, tol=1e-3, max_steps=400)
    d1, info1 = explicit_boosting(model, theta, digits["bd_x"], digits["bd_y"], boost=1.0,
                                  generator=torch.Generator().manual_seed(5), **kw)
    d4, info4 = explicit_boosting(model, theta, digits["bd_x"], digits["bd_y"], boost=4.0,
                                  generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(d4, 4 * d1, atol=1e-6, rtol=1e-5)
    assert info1["mal_loss"] <= 1e-3 and info1["steps"] < 400
    assert (_predict(model, theta + d1, digits["bd_x"]) == TARGET).all()  # the unboosted update hits


# ------------------------------------------------------------------------------------ distance term
def test_larger_rho_gives_update_closer_to_benign_mean(digits):
    model = _model()
    theta = model_to_flat(model)
    s = digits["shards"][-1]
    ref = _benign(model, theta, digits).mean(0)

    def dist(rho, mal_steps=1, form="norm"):
        d = alternating_minimisation(
            model, theta, digits["train_x"][s], digits["train_y"][s], digits["bd_x"], digits["bd_y"], ref,
            boost=N_CLIENTS, rho=rho, benign_epochs=2, mal_steps=mal_steps, batch_size=BATCH, dist=form,
            generator=torch.Generator().manual_seed(6))
        return (d - ref).norm().item()

    # stealth objective alone: the rho-term is what pulls towards the reference
    assert dist(10.0, mal_steps=0) < 0.5 * dist(0.0, mal_steps=0)
    # the whole attack: monotone in rho, and clearly closer at rho = 1 than without the term
    full = [dist(r) for r in (0.0, 0.1, 1.0)]
    MEASURED.update(dist_rho0=full[0], dist_rho0_1=full[1], dist_rho1=full[2])
    assert full[0] > full[1] > full[2]
    assert full[2] < 0.95 * full[0]
    assert dist(1.0, form="sq") < full[0]


# ------------------------------------------------------------------------------------ adaptive (PLR)
def test_adaptive_plr_term_brings_plrs_closer(digits):
    """eta > 0 lowers the measured d_plr (Eq. 10, norm reading) between the malicious model and the mean
    benign model on the attacker's data. Run with Bhagoji's stealth ratio ls = 10, benign_epochs = 10:
    with ls = 1 the boosted malicious steps dominate on this small model (decision record)."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    x, y = digits["train_x"], digits["train_y"]
    theta = model_to_flat(model)
    theta = theta + benign_update(model, theta, x, y, epochs=3, lr=1e-3, batch_size=BATCH, generator=g)
    ben = _benign(model, theta, digits)
    s = digits["shards"][-1]
    base = {"ls": 10, "benign_epochs": 10}
    out = {}
    for eta in (0.0, 0.1):
        delta = ATTACKS.get("adaptive_plr")(_ctx(model, theta, ben, digits, [s], {**base, "eta": eta}))[0]
        out[eta] = d_plr(model, theta + delta, theta + ben.mean(0), x[s], y[s], 10)
    benign_level = max(d_plr(model, theta + b, theta + ben.mean(0), x[s], y[s], 10) for b in ben)
    MEASURED.update(d_plr_eta0=out[0.0], d_plr_eta0_1=out[0.1], d_plr_benign_max=benign_level)
    assert out[0.1] < 0.7 * out[0.0], out


def test_adaptive_with_eta_zero_equals_krum_backdoor(digits):
    model = _model()
    theta = model_to_flat(model)
    ben = _benign(model, theta, digits)
    shard = [digits["shards"][-1]]
    a = ATTACKS.get("adaptive_plr")(_ctx(model, theta, ben, digits, shard, {"eta": 0.0}))
    k = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, shard))
    assert torch.equal(a, k)


# ------------------------------------------------------------------------------------ what is read
@pytest.mark.parametrize("name", ["krum_backdoor", "median_backdoor", "adaptive_plr"])
def test_attackers_read_only_their_own_shard(digits, name):
    """Two attackers. Poisoning everything an attacker must not read -- the template's own parameters and
    the other attacker's shard -- leaves its row bit-identical; poisoning its own shard does not (for the
    attacks that train on it), so the check can fail."""
    model = _model()
    theta = model_to_flat(model)
    ben = _benign(model, theta, digits)
    shards = [digits["shards"][-2], digits["shards"][-1]]
    opts = {"benign_epochs": 1, "max_steps": 60}
    clean = ATTACKS.get(name)(_ctx(model, theta, ben, digits, shards, opts))
    assert clean.shape == (2, theta.numel()) and torch.isfinite(clean).all()

    with torch.no_grad():  # the template's parameters are not the global model
        for p in model.parameters():
            p.fill_(float("nan"))
    ctx = _ctx(model, theta, ben, digits, shards, opts)
    ctx.attacker_data[1] = (torch.full_like(ctx.attacker_data[1][0], float("nan")), ctx.attacker_data[1][1])
    poisoned = ATTACKS.get(name)(ctx)
    assert torch.equal(poisoned[0], clean[0])
    if name == "median_backdoor":  # trains on the backdoor set only: the shard is not read at all
        assert torch.equal(poisoned[1], clean[1])
    else:
        assert not torch.isfinite(poisoned[1]).all()

    ctx = _ctx(model, theta, ben, digits, shards, opts)  # and the other way round, labels too
    x0, y0 = ctx.attacker_data[0]
    ctx.attacker_data[0] = (torch.full_like(x0, float("nan")), (y0 + 1) % 10)
    assert torch.equal(ATTACKS.get(name)(ctx)[1], clean[1])


def test_code_variant_uses_own_estimate_not_benign_updates(digits):
    """variant="code" (dist_self): the stealth reference is the attacker's own honest update, so the benign
    updates are not read; the default white-box variant does read their mean."""
    model = _model()
    theta = model_to_flat(model)
    nan_ben = torch.full((N_BEN, theta.numel()), float("nan"))
    shards = [digits["shards"][-2], digits["shards"][-1]]
    code = ATTACKS.get("krum_backdoor")(_ctx(model, theta, nan_ben, digits, shards,
                                              {"variant": "code", "self_epochs": 1}))
    assert torch.isfinite(code).all()
    assert torch.equal(code[0], code[1])  # the code's attackers send copies of attacker 0's update
    paper = ATTACKS.get("krum_backdoor")(_ctx(model, theta, nan_ben, digits, shards[:1], {"iterations": 1}))
    assert not torch.isfinite(paper).all()


def test_deterministic_and_leaves_global_rng_alone(digits):
    model = _model()
    theta = model_to_flat(model)
    ben = _benign(model, theta, digits)
    shard = [digits["shards"][-1]]
    state = torch.random.get_rng_state()
    a = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, shard, {"iterations": 3}, seed=11))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, shard, {"iterations": 3}, seed=11))
    c = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, shard, {"iterations": 3}, seed=12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_report_measurements():
    """Not a check: prints what the tests above measured (visible with pytest -s)."""
    for k, v in sorted(MEASURED.items()):
        print(f"{k} = {v:.4f}")


# ----------------------------------------------------------- the sync-free loop against the plain one
def _reference_alternating(model, theta_flat, x_own, y_own, x_bd, y_bd, ben_mean_delta, *, boost, rho,
                           benign_epochs=2.0, ls=1, mal_steps=1, iterations=None, lr=1e-3, batch_size=64,
                           generator=None, dist="norm", order="benign_first"):
    """Bhagoji et al.'s alternating minimisation written plainly (two torch.optim.Adam, Python-side skip
    of the malicious step when its loss is 0): the implementation before the loop became capturable."""
    import math

    import torch.nn.functional as F

    from robustfl.attacks.backdoor import batch_stream, distance_rows
    from robustfl.engine import ModelRows
    from robustfl.engine.adam import ADAM_BETAS, ADAM_EPS

    spec = ParamSpec(model)
    theta = theta_flat.detach().float()
    ref = theta if ben_mean_delta is None else theta + ben_mean_delta
    steps = max(1, round(benign_epochs * math.ceil(len(y_own) / batch_size)))
    n_iter = math.ceil(steps / ls) if iterations is None else int(iterations)
    w = theta.clone().requires_grad_(True)
    opt_ben = torch.optim.Adam([w], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    opt_mal = torch.optim.Adam([w], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    stream = batch_stream(len(y_own), batch_size, generator, torch.device("cpu"))

    def stealth():
        for _ in range(ls):
            idx = next(stream)
            _, logits = forward_with(model, spec.unflatten(w), x_own[idx])
            loss = F.cross_entropy(logits.float(), y_own[idx])
            if rho > 0:
                loss = loss + rho * distance_rows((w - ref)[None], dist)[0]
            opt_ben.zero_grad(set_to_none=True)
            loss.backward()
            opt_ben.step()

    def malicious():
        for _ in range(mal_steps):
            _, logits = forward_with(model, spec.unflatten(w), x_bd)
            mal_loss = F.cross_entropy(logits.float(), y_bd)
            if not mal_loss.item() > 0.0:
                return
            start = w.detach().clone()
            opt_mal.zero_grad(set_to_none=True)
            mal_loss.backward()
            opt_mal.step()
            with torch.no_grad():
                w.copy_(start + boost * (w - start))

    with ModelRows(model, 1, "cpu").training([generator]):
        for _ in range(n_iter):
            if order == "benign_first":
                stealth()
                if mal_steps > 0:
                    malicious()
            else:
                if mal_steps > 0:
                    malicious()
                stealth()
    return w.detach() - theta


@pytest.mark.parametrize("kw", [
    dict(boost=6.0, rho=1e-4, ls=1, mal_steps=1),
    dict(boost=3.0, rho=0.5, ls=3, mal_steps=2, dist="sq", order="mal_first"),
    dict(boost=0.0, rho=0.0, ls=2, mal_steps=1, benign_epochs=1.5),
    dict(boost=10.0, rho=1.0, ls=1, mal_steps=3, iterations=4),
])
def test_alternating_minimisation_equals_the_plain_loop(digits, kw):
    """The sync-free loop (stacked Adam, on-device skip, padded partial batches when graphed) gives the
    plain two-optimiser loop's update; the attacker's shard (250 samples) ends every epoch on a partial
    batch of 26."""
    model = _model()
    theta = model_to_flat(model)
    s = digits["shards"][-1]
    ref = _benign(model, theta, digits).mean(0)
    args = (model, theta, digits["train_x"][s], digits["train_y"][s], digits["bd_x"], digits["bd_y"], ref)
    got = alternating_minimisation(*args, batch_size=BATCH, generator=torch.Generator().manual_seed(11), **kw)
    want = _reference_alternating(*args, batch_size=BATCH, generator=torch.Generator().manual_seed(11), **kw)
    assert want.norm() > 1e-3
    # float rounding differs (masked mean vs mean, stacked vs torch Adam arithmetic) and Adam turns
    # noise-level gradients into ~lr steps (tests/test_train.py): compare in norm, bound the outliers
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert ((got - want).abs() > 1e-5).float().mean().item() < 1e-3


def test_a_zero_backdoor_loss_skips_the_malicious_step_like_the_plain_loop(digits):
    """A model already certain of the backdoor label (backdoor cross-entropy exactly 0 in float32): the
    malicious step must be skipped on device exactly where the plain loop returns early."""
    model = _model()
    spec = ParamSpec(model)
    params = {k: v.clone() for k, v in spec.unflatten(model_to_flat(model)).items()}
    last_bias = [k for k in spec.names if k.endswith("bias")][-1]
    params[last_bias][TARGET] = 1e4  # logits: the target class wins by 1e4 on every input
    theta = spec.flatten(params)
    s = digits["shards"][-1]
    args = (model, theta, digits["train_x"][s], digits["train_y"][s], digits["bd_x"], digits["bd_y"], None)
    kw = dict(boost=50.0, rho=0.0, ls=1, mal_steps=2, iterations=3, batch_size=BATCH)
    got = alternating_minimisation(*args, generator=torch.Generator().manual_seed(2), **kw)
    want = _reference_alternating(*args, generator=torch.Generator().manual_seed(2), **kw)
    honest = alternating_minimisation(*args, generator=torch.Generator().manual_seed(2), **{**kw, "mal_steps": 0})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, honest, rtol=0, atol=0)  # no boosted step happened


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_alternating_minimisation_equals_eager_on_the_gpu(monkeypatch):
    """On the GPU the iteration is captured as a CUDA graph and replayed: the same update as the eager
    loop (random CIFAR-10-shaped data, the paper's options), up to cuDNN's run-to-run noise."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("cifar10_cnn", 10, 3).to(dev)
    theta = model_to_flat(model)
    x = torch.randint(0, 256, (300, 32, 32, 3), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (300,), device=dev)
    xb = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, device=dev)
    yb = torch.full((40,), TARGET, device=dev)
    kw = dict(boost=10.0, rho=1e-4, benign_epochs=1.0, batch_size=BATCH)  # 10 iterations, last batch 12
    out = {}
    for graph in (False, True):
        out[graph] = alternating_minimisation(model, theta, x, y, xb, yb, None, engine=EngineOptions(attack_cuda_graph=graph),
                                              generator=torch.Generator().manual_seed(1), **kw)
    assert out[False].norm() > 1e-3
    assert ((out[True] - out[False]).norm() / out[False].norm()).item() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_explicit_boosting_equals_eager_on_the_gpu(monkeypatch):
    """Attack-Coomed-Backdoor's boosting to convergence with its steps replayed from a CUDA graph after
    the first EngineOptions.attack_graph_min_steps: the same steps as the eager loop (torch.optim.Adam) on random
    CIFAR-10-shaped data, up to float rounding, when it runs to max_steps (tol below any loss), when it
    converges after the capture (the default tol: the replay that computed the stopping loss is undone),
    and when it stops within the eager steps (a model already certain of the backdoor label: loss 0,
    stop at min_steps)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("cifar10_cnn", 10, 3).to(dev)
    theta = model_to_flat(model)
    xb = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, device=dev)
    yb = torch.full((40,), TARGET, device=dev)
    spec = ParamSpec(model)
    params = {k: v.clone() for k, v in spec.unflatten(theta).items()}
    params[[k for k in spec.names if k.endswith("bias")][-1]][TARGET] = 1e4
    certain = spec.flatten(params)
    steps = []
    for start, kw in [(theta, dict(max_steps=30, tol=-1.0)), (theta, dict(max_steps=1000)),
                      (certain, dict(max_steps=30, min_steps=2))]:
        out = {}
        for graph in (False, True):
            out[graph] = explicit_boosting(model, start, xb, yb, boost=10.0, engine=EngineOptions(attack_cuda_graph=graph),
                                           generator=torch.Generator().manual_seed(1), **kw)
        (d0, i0), (d1, i1) = out[False], out[True]
        assert i0["steps"] == i1["steps"]
        steps.append(i0["steps"])
        if start is theta:
            assert d0.norm() > 1e-3
            assert ((d1 - d0).norm() / d0.norm()).item() < 1e-2
        else:  # two Adam steps on a zero gradient: no change in either
            torch.testing.assert_close(d1, d0, rtol=0, atol=1e-6)
    # the second case ran past the eager steps: the step was captured and replayed at least once
    assert steps[0] == 30 and EngineOptions().attack_graph_min_steps <= steps[1] < 1000 and steps[2] == 2


# ------------------------------------------------------------------ stealth: start, ball, final boost
def test_benign_spread_and_projection_by_hand():
    """Four updates at the corners of a square of side 2: mean (1, 1), each sqrt(2) from it, so s = sqrt(2).
    A row at distance 5 from the centre lands on the sphere of radius 1; one inside is kept bit for bit."""
    from robustfl.attacks.backdoor import benign_spread, project_rows_

    mean, s = benign_spread(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]))
    torch.testing.assert_close(mean, torch.tensor([1.0, 1.0]))
    assert s == pytest.approx(2 ** 0.5)
    w = torch.tensor([[4.0, 5.0], [1.1, 0.7]])  # (3, 4) and (0.1, -0.3) from the centre
    inside = w[1].clone()
    project_rows_(w, mean, torch.tensor(1.0))
    torch.testing.assert_close(w[0], torch.tensor([1.0 + 0.6, 1.0 + 0.8]))
    assert torch.equal(w[1], inside)
    with pytest.raises(ValueError, match="at least two benign updates"):
        benign_spread(torch.zeros(1, 3))


def _stealth_setup(digits):
    """A global model trained for a round of FedAvg, the next round's 5 benign updates."""
    model = _model()
    theta = model_to_flat(model)
    theta = theta + _benign(model, theta, digits).mean(0)
    return model, theta, _benign(model, theta, digits, seed=3)


@pytest.mark.parametrize("params", [{"radius": 0.5}, {"radius": 0.5, "start": "benign_mean"},
                                    {"radius": 0.3, "project_at": "final"},
                                    {"radius": 0.5, "boost_at": "final", "boost": 4.0}])
def test_projected_update_stays_within_the_configured_distance_of_the_benign_mean(digits, params):
    from robustfl.attacks.backdoor import benign_spread

    model, theta, ben = _stealth_setup(digits)
    mean, s = benign_spread(ben)
    free = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]],
                                              {k: v for k, v in params.items() if k not in ("radius", "project_at")}))
    got = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]], params))
    dist_free, dist = (free[0] - mean).norm().item(), (got[0] - mean).norm().item()
    MEASURED[f"stealth_dist_{sorted(params.items())}"] = dist / s
    assert dist_free > params["radius"] * s * 1.5  # unconstrained, the attack is far outside the ball ...
    assert dist <= params["radius"] * s * (1 + 1e-5)  # ... projected, it is inside


def test_a_projected_krum_backdoor_is_chosen_by_krum(digits):
    """What the attack is for: inside half the benign spread, Krum (f = 1) selects the attacker's update,
    which the unconstrained attack never achieves."""
    from robustfl.aggregation import aggregators as agg

    model, theta, ben = _stealth_setup(digits)
    chosen = {}
    for name, params in (("free", {}), ("ball", {"radius": 0.5, "start": "benign_mean"})):
        mal = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]], params))
        chosen[name] = int(agg.krum(torch.cat([ben, mal]), f=1).weights.argmax())
    assert chosen["free"] != N_BEN and chosen["ball"] == N_BEN, chosen


def test_final_boost_is_affine_in_the_attackers_own_change(digits):
    """boost_at final: delta(b) = start + b (delta(1) - start), start = 0 or the mean benign update."""
    model, theta, ben = _stealth_setup(digits)
    for start, base in (("theta", torch.zeros_like(theta)), ("benign_mean", ben.mean(0))):
        one, four = (ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]],
                                                       {"boost_at": "final", "boost": b, "start": start}))
                     for b in (1.0, 4.0))
        torch.testing.assert_close(four[0], base + 4.0 * (one[0] - base), rtol=1e-5, atol=1e-6)


def test_stealth_options_are_validated(digits):
    model = _model()
    theta = model_to_flat(model)
    ben = torch.randn(N_BEN, theta.numel())
    for params, msg in (({"radius": 0}, "radius"), ({"radius": "1"}, "radius"), ({"boost_at": "x"}, "boost_at"),
                        ({"start": "mean"}, "start"), ({"project_at": "always"}, "project_at")):
        with pytest.raises(ValueError, match=msg):
            ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]], params))
    with pytest.raises(ValueError, match="alternating"):
        ATTACKS.get("median_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]], {"radius": 1.0}))


def test_the_diagnostics_see_the_projected_attacker_on_the_sphere(digits):
    """robustfl.fl.metrics.attack_diagnostics computes the benign spread from pairwise distances, the attack
    from the mean (benign_spread): two computations of one definition, which must agree -- the projected
    attacker lies at 0.5 spreads, and Krum ranks it first."""
    from robustfl.fl.metrics import attack_diagnostics

    model, theta, ben = _stealth_setup(digits)
    mal = ATTACKS.get("krum_backdoor")(_ctx(model, theta, ben, digits, [digits["shards"][-1]],
                                             {"radius": 0.5, "start": "benign_mean"}))
    diag = attack_diagnostics(torch.cat([ben, mal]), range(N_BEN), f=1)
    assert diag["dist_ratio"][N_BEN].item() == pytest.approx(0.5, rel=1e-4)
    assert diag["krum_rank"][N_BEN].item() == 1
