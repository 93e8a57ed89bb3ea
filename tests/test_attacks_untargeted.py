"""Tests for robustfl.attacks.untargeted (Fang et al., USENIX Security 2020, full knowledge)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustfl.aggregation import aggregators as A
from robustfl.attacks import ATTACKS, AttackContext, is_targeted
from robustfl.attacks import untargeted as U

F64 = torch.float64


def benign(n, d, seed=0, spread=0.1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    mu = 0.05 * torch.randn(d, generator=g, dtype=dtype)
    return mu + spread * torch.randn(n, d, generator=g, dtype=dtype)


# -------------------------------------------------------------------------------------------- Krum
def test_lambda_upper_bound_by_hand():
    # 1-D benign updates [1, 2, 4, 8], c = 1 attacker: m = 5, m - 2c - 1 = 2, m - c - 2 = 2 neighbours, d = 1
    # sum of the 2 nearest benign distances: 1: 1+3=4, 2: 1+2=3, 4: 2+3=5, 8: 4+6=10 -> min 3
    # max D(w_i, theta) = max |delta_i| = 8  => lambda_ub = 3 / (2 * 1) + 8 / 1 = 9.5
    x = torch.tensor([[1.0], [2.0], [4.0], [8.0]], dtype=F64)
    assert math.isclose(U.fang_krum_lambda_upper_bound(x, 1), 9.5)


def test_lambda_upper_bound_bruteforce():
    x = benign(6, 3, seed=1)
    c = 2
    m, d = 6 + c, 3
    sums = []
    for i in range(6):
        ds = sorted(float((x[i] - x[j]).norm()) for j in range(6) if j != i)
        sums.append(sum(ds[: m - c - 2]))
    ref = min(sums) / ((m - 2 * c - 1) * math.sqrt(d)) + max(float(x[i].norm()) for i in range(6)) / math.sqrt(d)
    assert math.isclose(U.fang_krum_lambda_upper_bound(x, c), ref, rel_tol=1e-12)
    with pytest.raises(ValueError, match="m - 2c - 1"):
        U.fang_krum_lambda_upper_bound(x[:3], 2)  # m = 5, c = 2 -> m - 2c - 1 = 0


@pytest.mark.parametrize("seed,n_ben,n_mal,f,distance", [
    (0, 7, 3, 3, "squared"), (1, 7, 3, 3, "euclidean"), (2, 8, 2, 2, "squared"), (3, 15, 5, 4, "squared"),
])
def test_fang_krum_gets_selected_and_deviates_against_s(seed, n_ben, n_mal, f, distance):
    x = benign(n_ben, 200, seed)
    s = U.direction(x)
    mal, det = U.fang_krum(x, n_mal, f, distance=distance, return_details=True)
    assert mal.shape == (n_mal, 200)
    assert det[0].selected
    lam0 = U.fang_krum_lambda_upper_bound(x, n_mal)
    k = round(math.log2(lam0 / det[0].lam))
    assert math.isclose(det[0].lam, lam0 / 2**k) and det[0].tries == k + 1  # halved k times
    assert torch.allclose(mal, (-det[0].lam * s).expand(n_mal, -1))  # all attackers send -lambda * s
    r = A.krum(torch.cat([mal, x]), f, distance=distance)
    assert r.info["selected"][0] < n_mal
    assert float(r.update @ s) < 0
    clean = A.krum(x, min(f, (n_ben - 3) // 2), distance=distance)
    assert float(r.update @ s) < float(clean.update @ s)


def test_fang_krum_lambda_is_the_first_power_of_two_that_works():
    # the search halves from lam_init: every larger lambda tried must have failed
    x = benign(7, 50, seed=4)
    mal, det = U.fang_krum(x, 3, 3, lam_init=1.0, return_details=True)
    lam = det[0].lam
    assert det[0].selected and lam <= 1.0
    s = U.direction(x)
    for j in range(det[0].tries - 1):
        bigger = 1.0 / 2**j
        r = A.krum(torch.cat([(-bigger * s).expand(3, -1), x]), 3)
        assert r.info["selected"][0] >= 3
    assert A.krum(torch.cat([mal, x]), 3).info["selected"][0] < 3


def test_fang_krum_gives_up_below_threshold():
    # Benign updates tightly clustered far from 0: -lambda * s is never the Krum choice (a lone attacker
    # with f = 1 cannot pull the score down), so the search stops and sends the last crafted update.
    x = 5.0 + benign(6, 20, seed=5, spread=1e-3)
    mal, det = U.fang_krum(x, 1, 1, threshold=1e-3, return_details=True)
    assert not det[0].selected
    assert 1e-3 <= det[0].lam < 2e-3
    assert torch.allclose(mal[0], -det[0].lam * U.direction(x))
    lam0 = U.fang_krum_lambda_upper_bound(x, 1)
    assert det[0].tries == math.floor(math.log2(lam0 / 1e-3)) + 1


def test_fang_krum_epsilon_ball():
    x = benign(7, 30, seed=6)
    g = torch.Generator().manual_seed(0)
    mal = U.fang_krum(x, 3, 3, epsilon=0.01, generator=g)
    ref = U.fang_krum(x, 3, 3)
    assert torch.equal(mal[0], ref[0])
    dist = (mal[1:] - mal[0]).norm(dim=1)
    assert bool((dist <= 0.01 + 1e-12).all()) and bool((dist > 0).all())
    assert not torch.equal(mal[1], mal[2])
    again = U.fang_krum(x, 3, 3, epsilon=0.01, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mal, again)


def test_fang_krum_code_variant_layerwise():
    x = benign(7, 60, seed=7)
    x[:, 50:] *= 30.0  # a layer with a very different scale
    slices = [(0, 20), (20, 50), (50, 60)]
    mal, det = U.fang_krum(x, 3, 3, variant="code", layer_slices=slices, return_details=True)
    assert len(det) == 3
    s = U.direction(x)
    assert torch.equal(mal[0], mal[1]) and torch.equal(mal[1], mal[2])
    for (a, b), res in zip(slices, det):
        assert res.selected
        assert math.log2(res.lam) == round(math.log2(res.lam)) and res.lam <= 1.0  # 1, 1/2, 1/4, ...
        assert torch.allclose(mal[0, a:b], -res.lam * s[a:b])
        layer = torch.cat([mal[:, a:b], x[:, a:b]])
        assert A.krum(layer, 3).info["selected"][0] < 3
        if res.lam < 1.0:  # twice the lambda failed on this layer
            layer2 = torch.cat([(-2 * res.lam * s[a:b]).expand(3, -1), x[:, a:b]])
            assert A.krum(layer2, 3).info["selected"][0] >= 3
    with pytest.raises(ValueError, match="tile"):
        U.fang_krum(x, 3, 3, variant="code", layer_slices=[(0, 20), (30, 60)])


def test_fang_krum_bad_input():
    x = benign(7, 10)
    with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
        U.fang_krum(x, 1, 3)  # n = 8, f = 3
    with pytest.raises(ValueError, match="variant"):
        U.fang_krum(x, 3, 3, variant="nope")
    assert U.fang_krum(x, 0, 3).shape == (0, 10)


# ------------------------------------------------------------------------------------ trimmed mean
# Update-space values of 3 benign clients in 4 coordinates (b = 2), with s = sign(mean):
#   c0: [1, 2, 3]    s=+1, w_min = 1 > 0   -> [w_min/b, w_min]   = [0.5, 1]
#   c1: [-1, -2, -3] s=-1, w_max = -1 <= 0 -> [w_max, w_max/b]   = [-1, -0.5]
#   c2: [-4, 1, 2]   s=-1, w_max = 2 > 0   -> [w_max, b w_max]   = [2, 4]
#   c3: [4, -1, -2]  s=+1, w_min = -2 <= 0 -> [b w_min, w_min]   = [-4, -2]
# Model space with theta = [-10, 10, -10, 10] (models = theta + updates; s still from the updates):
#   c0: [-9, -8, -7]  s=+1, w_min = -9  -> [-18, -9]  -> minus theta: [-8, 1]
#   c1: [9, 8, 7]     s=-1, w_max = 9   -> [9, 18]    -> [-1, 8]
#   c2: [-14, -9, -8] s=-1, w_max = -8  -> [-8, -4]   -> [2, 6]
#   c3: [14, 9, 8]    s=+1, w_min = 8   -> [4, 8]     -> [-6, -2]
TM_X = torch.tensor([[1.0, -1.0, -4.0, 4.0], [2.0, -2.0, 1.0, -1.0], [3.0, -3.0, 2.0, -2.0]], dtype=F64)
TM_THETA = torch.tensor([-10.0, 10.0, -10.0, 10.0], dtype=F64)


def test_tm_intervals_by_hand_update_space():
    lo, hi = U.fang_tm_intervals(TM_X, space="update")
    assert lo.tolist() == [0.5, -1.0, 2.0, -4.0]
    assert hi.tolist() == [1.0, -0.5, 4.0, -2.0]


def test_tm_intervals_by_hand_model_space():
    lo, hi = U.fang_tm_intervals(TM_X, theta=TM_THETA, space="model")
    assert lo.tolist() == [-18.0, 9.0, -8.0, 4.0]
    assert hi.tolist() == [-9.0, 18.0, -4.0, 8.0]
    with pytest.raises(ValueError, match="theta"):
        U.fang_tm_intervals(TM_X, space="model")
    with pytest.raises(ValueError, match="b must"):
        U.fang_tm_intervals(TM_X, space="update", b=1.0)


@pytest.mark.parametrize("space", ["model", "update"])
def test_tm_crafted_inside_intervals(space):
    x = benign(7, 500, seed=8)
    theta = torch.randn(500, generator=torch.Generator().manual_seed(9), dtype=F64)
    g = torch.Generator().manual_seed(1)
    mal = U.fang_trimmed_mean(x, 3, theta=theta, space=space, generator=g)
    lo, hi = U.fang_tm_intervals(x, theta=theta, space=space)
    vals = mal + theta if space == "model" else mal
    assert bool(((vals >= lo - 1e-12) & (vals <= hi + 1e-12)).all())
    # on the side opposite to s: >= benign max where s = -1, <= benign min where s = +1
    ref = x + theta if space == "model" else x
    s = U.direction(x)
    assert bool((vals[:, s < 0] >= ref.max(0).values[s < 0] - 1e-12).all())
    assert bool((vals[:, s > 0] <= ref.min(0).values[s > 0] + 1e-12).all())
    assert not torch.equal(mal[0], mal[1])  # independent samples (Fang et al.)
    same = U.fang_trimmed_mean(x, 3, theta=theta, space=space, same_values=True, generator=g)
    assert torch.equal(same[0], same[1]) and torch.equal(same[1], same[2])


@pytest.mark.parametrize("space", ["model", "update"])
@pytest.mark.parametrize("seed", [0, 1])
def test_tm_attack_pulls_trimmed_mean_and_median_against_s(space, seed):
    n, n_mal, d = 10, 3, 400
    x = benign(n, d, seed=10 + seed)
    theta = 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    ben = x[n_mal:]  # the attackers' own honest updates are replaced
    s = U.direction(ben)
    mal = U.fang_trimmed_mean(ben, n_mal, theta=theta, space=space, generator=torch.Generator().manual_seed(seed))
    attacked = torch.cat([mal, ben])
    for rule in (lambda u: A.trimmed_mean(u, n_mal), A.median):
        with_attack, no_attack = rule(attacked).update, rule(x).update
        assert float((with_attack - no_attack) @ s) < 0
        assert float(with_attack @ s) < float(no_attack @ s)


# The authors'-code variant on the same updates plus a fifth coordinate whose benign sum is 0.
# s = sign(sum of deltas), v = theta - delta, value drawn in the interval, delta_mal = theta - value:
#   c0: theta=-10, delta [1, 2, 3]    s=+1: v [-11,-12,-13], v_max=-11 <= 0 -> [v_max, v_max/b] = [-11, -5.5]
#       -> delta_mal in [-4.5, 1]  (<= min delta = 1)
#   c1: theta=10,  delta [-1,-2,-3]   s=-1: v [11, 12, 13],  v_min=11 > 0   -> [v_min/b, v_min] = [5.5, 11]
#       -> delta_mal in [-1, 4.5]  (>= max delta = -1)
#   c2: theta=-10, delta [-4, 1, 2]   s=-1: v [-6,-11,-12],  v_min=-12 <= 0 -> [b v_min, v_min] = [-24, -12]
#       -> delta_mal in [2, 14]    (>= max delta = 2)
#   c3: theta=10,  delta [4,-1,-2]    s=+1: v [6, 11, 12],   v_max=12 > 0   -> [v_max, b v_max] = [12, 24]
#       -> delta_mal in [-14, -2]  (<= min delta = -2)
#   c4: theta=3,   delta [1,-1, 0]    s=0 (counts as s >= 0): v [2, 4, 3], v_max=4 > 0 -> [4, 8]
#       -> delta_mal in [-5, -1]   (<= min delta = -1)
CODE_X = torch.cat([TM_X, torch.tensor([[1.0], [-1.0], [0.0]], dtype=F64)], dim=1)
CODE_THETA = torch.cat([TM_THETA, torch.tensor([3.0], dtype=F64)])
CODE_LO = [-11.0, 5.5, -24.0, 12.0, 4.0]
CODE_HI = [-5.5, 11.0, -12.0, 24.0, 8.0]
CODE_DELTA_LO = [-4.5, -1.0, 2.0, -14.0, -5.0]
CODE_DELTA_HI = [1.0, 4.5, 14.0, -2.0, -1.0]


def test_code_tm_intervals_by_hand():
    lo, hi = U.code_tm_intervals(CODE_X, CODE_THETA)
    assert lo.tolist() == CODE_LO and hi.tolist() == CODE_HI
    with pytest.raises(ValueError, match="b must"):
        U.code_tm_intervals(CODE_X, CODE_THETA, b=0.5)
    with pytest.raises(ValueError, match="theta"):
        U.code_tm_intervals(CODE_X, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d=5"):
        U.code_tm_intervals(CODE_X, TM_THETA)


@pytest.mark.parametrize("seed", range(5))
def test_code_tm_crafted_by_hand(seed):
    mal = U.code_trimmed_mean(CODE_X, 3, CODE_THETA, generator=torch.Generator().manual_seed(seed))
    assert mal.shape == (3, 5) and mal.dtype == F64
    assert torch.equal(mal[0], mal[1]) and torch.equal(mal[1], mal[2])  # identical copies
    value = CODE_THETA - mal[0]  # what was drawn: delta_mal = theta - value
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for lo, v, hi in zip(CODE_LO, value.tolist(), CODE_HI))
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for lo, v, hi in zip(CODE_DELTA_LO, mal[0].tolist(), CODE_DELTA_HI))
    # against s: below every benign delta where s >= 0 (c0, c3, c4), above every one where s < 0 (c1, c2)
    dmin, dmax = CODE_X.min(0).values, CODE_X.max(0).values
    assert bool((mal[0, [0, 3, 4]] <= dmin[[0, 3, 4]]).all()) and bool((mal[0, [1, 2]] >= dmax[[1, 2]]).all())


def test_code_tm_draw_and_determinism():
    """value = lo + u (hi - lo) with u the generator's first U(0, 1) row; same seed, same update."""
    u = torch.rand((1, 5), generator=torch.Generator().manual_seed(4), dtype=F64)[0]
    lo, hi = torch.tensor(CODE_LO, dtype=F64), torch.tensor(CODE_HI, dtype=F64)
    mal = U.code_trimmed_mean(CODE_X, 2, CODE_THETA, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(mal[0], CODE_THETA - (lo + u * (hi - lo)), rtol=0, atol=1e-12)
    again = U.code_trimmed_mean(CODE_X, 2, CODE_THETA, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mal, again)
    assert U.code_trimmed_mean(CODE_X, 0, CODE_THETA).shape == (0, 5)


def test_code_tm_is_fang_model_space_mirrored():
    """The code variant equals Fang's model-space attack on the updates -delta, negated (one shared draw)."""
    x = benign(7, 300, seed=3)
    theta = torch.randn(300, generator=torch.Generator().manual_seed(5), dtype=F64)
    code = U.code_trimmed_mean(x, 3, theta, generator=torch.Generator().manual_seed(2))
    fang = U.fang_trimmed_mean(-x, 3, theta=theta, space="model", same_values=True,
                               generator=torch.Generator().manual_seed(2))
    assert torch.allclose(code, -fang, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_code_tm_attack_pulls_trimmed_mean_and_median_against_s(seed):
    n, n_mal, d = 10, 3, 400
    x = benign(n, d, seed=20 + seed)
    theta = 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    ben = x[n_mal:]
    s = U.direction(ben)
    mal = U.code_trimmed_mean(ben, n_mal, theta, generator=torch.Generator().manual_seed(seed))
    attacked = torch.cat([mal, ben])
    for rule in (lambda u: A.trimmed_mean(u, 1), lambda u: A.trimmed_mean(u, n_mal), A.median):
        with_attack, no_attack = rule(attacked).update, rule(x).update
        assert float((with_attack - no_attack) @ s) < 0


# --------------------------------------------------------------------------------- registered wrappers
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)


def _ctx(params, f=0, n_attackers=3, n_ben=7, seed=11):
    model = TinyNet()
    d = sum(p.numel() for p in model.parameters())  # 4*3 + 3 + 3*2 + 2 = 23
    x = benign(n_ben, d, seed, dtype=torch.float32)
    return AttackContext(model=model, global_flat=torch.zeros(d), benign_updates=x, n_attackers=n_attackers,
                         n_clients=n_ben + n_attackers, round=0, defense="krum", f=f, params=params,
                         generator=torch.Generator().manual_seed(0))


def test_layer_slices_from_model():
    assert U.layer_slices_from_model(TinyNet()) == [(0, 12), (12, 15), (15, 21), (21, 23)]


def test_registered_krum_attack():
    assert "krum_untargeted" in ATTACKS and not is_targeted("krum_untargeted")
    fn = ATTACKS.get("krum_untargeted")
    ctx = _ctx({"variant": "paper"})
    mal = fn(ctx)
    assert mal.shape == (3, 23) and mal.dtype == torch.float32
    # ctx.f == 0 -> the attack simulates Krum with f = n_attackers = 3
    assert A.krum(torch.cat([mal, ctx.benign_updates]), 3).info["selected"][0] < 3
    ctx = _ctx({"variant": "code", "threshold": 1e-6})
    mal = fn(ctx)
    slices = U.layer_slices_from_model(ctx.model)
    ref, det = U.fang_krum(ctx.benign_updates, 3, 3, variant="code", layer_slices=slices, threshold=1e-6,
                           return_details=True)
    assert torch.equal(mal, ref)
    # Krum on a parameter tensor picks an attacker wherever the search succeeded; on the 3-entry bias
    # of layer a it gives up (a crafted point near 0 is never the most central there) -- lambda < 2e-6
    assert [r.selected for r in det] == [True, False, True, True]
    assert det[1].lam < 2e-6
    for (a, b), r in zip(slices, det):
        chosen = A.krum(torch.cat([mal[:, a:b], ctx.benign_updates[:, a:b]]), 3).info["selected"][0]
        assert (chosen < 3) == r.selected
    # with the server's f given, that f is used: f = 2 still needs n = 10 > 6
    ctx = _ctx({"variant": "paper"}, f=2)
    assert A.krum(torch.cat([fn(ctx), ctx.benign_updates]), 2).info["selected"][0] < 3
    with pytest.raises(ValueError, match="unknown params"):
        fn(_ctx({"lamda": 1.0}))


def test_registered_tm_attack():
    assert "trimmedmean_untargeted" in ATTACKS and not is_targeted("trimmedmean_untargeted")
    fn = ATTACKS.get("trimmedmean_untargeted")
    ctx = _ctx({"space": "update", "b": 3.0})
    mal = fn(ctx)
    lo, hi = U.fang_tm_intervals(ctx.benign_updates, space="update", b=3.0)
    assert mal.shape == (3, 23)
    assert bool(((mal.double() >= lo - 1e-6) & (mal.double() <= hi + 1e-6)).all())
    mal_model = fn(_ctx({}))  # default space="model" with theta = 0 is the same interval set here
    assert mal_model.shape == (3, 23)


def test_registered_tm_attack_code_variant():
    fn = ATTACKS.get("trimmedmean_untargeted")
    ctx = _ctx({"variant": "code"})
    ctx.global_flat = torch.linspace(-1.0, 1.0, 23)
    mal = fn(ctx)
    ref = U.code_trimmed_mean(ctx.benign_updates, 3, ctx.global_flat, generator=torch.Generator().manual_seed(0))
    assert mal.shape == (3, 23) and mal.dtype == torch.float32 and torch.equal(mal, ref)
    assert torch.equal(mal[0], mal[2])
    ctx = _ctx({"variant": "code", "b": 3.0})
    ctx.global_flat = torch.linspace(-1.0, 1.0, 23)
    lo, hi = U.code_tm_intervals(ctx.benign_updates, ctx.global_flat, b=3.0)
    value = ctx.global_flat.double() - fn(ctx)[0].double()
    assert bool(((value >= lo - 1e-5) & (value <= hi + 1e-5)).all())
    with pytest.raises(ValueError, match=r"\['same_values', 'space'\] apply to variant 'paper' only"):
        fn(_ctx({"variant": "code", "space": "update", "same_values": True}))
    with pytest.raises(ValueError, match="variant must be 'paper' or 'code'"):
        fn(_ctx({"variant": "fang"}))
    with pytest.raises(ValueError, match=r"unknown params \['spce'\]"):
        fn(_ctx({"variant": "code", "spce": "update"}))
