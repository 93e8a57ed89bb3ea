"""The defense suite's pure rules (robustfl.aggregation.suite) and pre-aggregators
(robustfl.aggregation.preaggregators): known answers worked out by hand from the papers' equations,
ByzFL cross-checks where ByzFL has the method, one property each paper claims, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from _byzfl import load_byzfl
from robustfl.aggregation import preaggregators as P
from robustfl.aggregation import suite as S

F64 = torch.float64
BZ = load_byzfl("aggregators.aggregators")
BZP = load_byzfl("aggregators.preaggregators")
needs_byzfl = pytest.mark.skipif(BZ is None or BZP is None, reason="byzfl is not installed")


def t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(n, d, seed=0, dtype=torch.float32):
    return torch.randn(n, d, generator=gen(seed), dtype=dtype)


def assert_weights_reproduce(res, x, extra=None, atol=1e-6):
    """``update = weights @ updates (+ extra)``: the weights are the clients' coefficients."""
    expect = res.weights.to(F64) @ x.to(F64)
    if extra is not None:
        expect = expect + extra.to(F64)
    assert torch.allclose(res.update.to(F64), expect, atol=atol, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- GeoMed
# 1-D points 0, 1, 10; v0 = mean = 11/3; distances 11/3, 8/3, 19/3; beta ∝ 1/11 : 1/8 : 1/19
# (the 3s cancel) = 152 : 209 : 88 over 1672 (sum 449/1672) -> v1 = (0*152 + 1*209 + 10*88)/449 = 1089/449
def test_geomed_one_weiszfeld_step_by_hand():
    x = t([[0.0], [1.0], [10.0]])
    r = S.geomed(x, iters=1, tol=0.0)
    assert r.update.item() == pytest.approx(1089 / 449, rel=1e-12)
    assert torch.allclose(r.weights, t([152 / 449, 209 / 449, 88 / 449]))
    assert r.info["iterations"] == 1 and r.info["objective"][0] == pytest.approx((11 + 8 + 19) / 9)
    assert_weights_reproduce(r, x)


def test_geomed_converges_to_the_median_in_one_dimension():
    # in 1-D the geometric median of 0, 1, 10 is the median 1; smoothed Weiszfeld gets within ~nu
    r = S.geomed(t([[0.0], [1.0], [10.0]]), iters=500, tol=0.0)
    assert r.update.item() == pytest.approx(1.0, abs=1e-4)
    # and the early stop on the relative objective change stops well before 500 iterations
    early = S.geomed(t([[0.0], [1.0], [10.0]]), iters=500, tol=1e-6)
    assert early.info["stopped_early"] and early.info["iterations"] < 500


def test_geomed_square_with_outlier_stays_near_the_square():
    # four corners of the unit square and one far point: the geometric median stays inside the square
    x = t([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    r = S.geomed(x, iters=200, tol=0.0)
    assert 0.5 < r.update[0].item() < 1.0 and 0.5 < r.update[1].item() < 1.0
    assert r.weights[4] < 0.01
    assert S.geomed(x).update.norm() < x.mean(0).norm()


@needs_byzfl
@pytest.mark.parametrize("n,d,seed,nu,T", [(9, 20, 0, 0.1, 3), (15, 50, 1, 1e-6, 5), (5, 7, 2, 0.5, 1)])
def test_geomed_matches_byzfl_from_zero(n, d, seed, nu, T):
    """ByzFL's GeometricMedian starts at the zero vector and runs exactly T steps: ours with init=zero, tol=0."""
    x = rand(n, d, seed)
    x[0] += 10.0
    ours = S.geomed(x, nu=nu, iters=T, tol=0.0, init="zero").update
    theirs = BZ.GeometricMedian(nu=nu, T=T)(x.clone())
    assert torch.allclose(ours, theirs, atol=1e-5)


@needs_byzfl
def test_geomed_default_start_differs_from_byzfl_but_converges_to_the_same_point():
    """Our default starts at the mean (the RFA authors' code), ByzFL at 0: after 1 step they differ, after
    many steps both reach the geometric median."""
    x = rand(12, 30, 3, dtype=F64)
    x[:3] += 5.0
    one_ours = S.geomed(x, nu=1e-6, iters=1, tol=0.0).update
    one_theirs = BZ.GeometricMedian(nu=1e-6, T=1)(x.clone())
    assert (one_ours.float() - one_theirs).abs().max() > 1e-3
    many_ours = S.geomed(x, nu=1e-6, iters=300, tol=0.0).update
    many_theirs = BZ.GeometricMedian(nu=1e-6, T=300)(x.clone())
    assert torch.allclose(many_ours.float(), many_theirs, atol=1e-4)


# ------------------------------------------------------------------------------------ centered clipping
# x0 = (3, 4) (norm 5), x1 = (0, 0.5), x2 = (-6, -8) (norm 10); tau = 1, v0 = 0, one step:
# factors 1/5, 1, 1/10 -> v1 = ((0.6, 0.8) + (0, 0.5) + (-0.6, -0.8)) / 3 = (0, 1/6)
# coefficients a = (0.2, 1, 0.1)/3, centre weight 1 - 1.3/3
def test_centered_clipping_by_hand():
    x = t([[3.0, 4.0], [0.0, 0.5], [-6.0, -8.0]])
    r = S.centered_clipping(x, tau=1.0, iters=1)
    assert torch.allclose(r.update, t([0.0, 1 / 6]))
    assert torch.allclose(r.weights, t([0.2 / 3, 1 / 3, 0.1 / 3]))
    assert r.info["centre_weight"] == pytest.approx(1 - 1.3 / 3)
    # centred at c: v1 = c + mean(clip(x_i - c)); the affine decomposition holds for several steps
    c = t([1.0, 1.0])
    r = S.centered_clipping(x, tau=2.0, iters=3, centre=c)
    assert_weights_reproduce(r, x, extra=r.info["centre_weight"] * c)
    v = c.clone()
    for _ in range(3):
        diff = x - v
        v = v + (diff * torch.clamp(2.0 / diff.norm(dim=1), max=1.0)[:, None]).mean(0)
    assert torch.allclose(r.update, v)


@needs_byzfl
@pytest.mark.parametrize("L,tau", [(1, 100.0), (2, 1.5), (3, 0.2)])
def test_centered_clipping_matches_byzfl_over_rounds(L, tau):
    """ByzFL's CenteredClipping keeps its previous output as the next centre (m = 0 at first), like our
    rule with the previous aggregate passed back in."""
    theirs = BZ.CenteredClipping(L=L, tau=tau)
    centre = None
    for rnd in range(4):
        x = rand(9, 20, rnd) + 0.3 * rnd
        x[rnd] *= 50.0
        ours = S.centered_clipping(x, tau=tau, iters=L, centre=centre).update
        assert torch.allclose(ours, theirs(x.clone()), atol=1e-5), rnd
        centre = ours


def test_centered_clipping_bounds_a_huge_update():
    x = 0.01 * rand(10, 64, 0)
    x[3] = 1e30
    r = S.centered_clipping(x, tau=0.5)
    assert torch.isfinite(r.update).all() and r.update.norm() <= 0.5 / 10 + x.norm(dim=1).max()


# -------------------------------------------------------------------------------------------------- DnC
# Points on a line: (1, 0), (-1, 0), (0, 0), (6, 0); mean (1.5, 0); centred first coordinates
# -0.5, -2.5, -1.5, 4.5; top right singular vector (±1, 0); scores 0.25, 6.25, 2.25, 20.25.
# f = 1, c = 1: drop the highest (client 3) -> mean of the rest (0, 0); c = 2: also client 1 -> (0.5, 0).
def test_dnc_by_hand():
    x = t([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [6.0, 0.0]])
    r = S.dnc(x, f=1, b=10, niters=1)
    assert torch.allclose(r.info["scores"][0], t([0.25, 6.25, 2.25, 20.25]))
    assert r.info["kept"] == [0, 1, 2] and torch.allclose(r.update, t([0.0, 0.0]))
    assert torch.allclose(r.weights, t([1 / 3, 1 / 3, 1 / 3, 0.0]))
    r = S.dnc(x, f=1, b=10, niters=1, c=2.0)
    assert r.info["kept"] == [0, 2] and torch.allclose(r.update, t([0.5, 0.0]))
    assert torch.allclose(S.dnc(x, f=0).update, x.mean(0))  # nothing removed


def test_dnc_removes_an_update_planted_along_the_top_singular_direction():
    """Shejwalkar & Houmansadr's claim: a malicious update far along the top singular direction of the
    centred updates has the largest projection and is removed, in every coordinate sample."""
    g = gen(1)
    n, d = 20, 3000
    mu = 0.1 * torch.randn(d, generator=g)
    x = mu + 0.05 * torch.randn(n, d, generator=g)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    for bad in (4, 11):
        x[bad] = mu + 10.0 * u  # the same direction: it dominates the top singular vector
    r = S.dnc(x, f=2, b=500, niters=5, generator=gen(7))
    assert r.info["kept"] == [i for i in range(n) if i not in (4, 11)]
    benign = [i for i in range(n) if i not in (4, 11)]
    assert torch.allclose(r.update, x[benign].mean(0), atol=1e-6)


def test_dnc_draws_coordinates_from_the_generator_only():
    x = rand(12, 500, 0)
    x[0] += 1.0
    state = torch.get_rng_state()
    a = S.dnc(x, f=1, b=40, niters=3, generator=gen(3))
    b = S.dnc(x, f=1, b=40, niters=3, generator=gen(3))
    c = S.dnc(x, f=1, b=40, niters=3, generator=gen(4))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(a.info["scores"], b.info["scores"]) and not torch.equal(a.info["scores"], c.info["scores"])
    # no generator: the fixed-seed fallback, the same draws every call
    fallback = S.dnc(x, f=1, b=40, generator=S.fallback_generator())
    assert torch.equal(S.dnc(x, f=1, b=40).info["scores"], fallback.info["scores"])


# -------------------------------------------------------------------------------------------- SignGuard
# g0 = (1, 1, 1, -1), g1 = (1, 1, -1, 1), g2 = 2 g0 (norm 4), g3 = 0.05 g0 (norm 0.1), g4 = -g0.
# norms 2, 2, 4, 0.1, 2 -> median M = 2; ratios 1, 1, 2, 0.05, 1 -> S1 = {0, 1, 2, 4} (0.05 < 0.1).
# sign fractions (pos, zero, neg): g0..g3 (3/4, 0, 1/4), g4 (1/4, 0, 3/4) -> the majority cluster S2 = {0..3}.
# S = {0, 1, 2}; g2 clipped to M: (1, 1, 1, -1). Aggregate (g0 + g1 + g2/2) / 3 = (1, 1, 1/3, -1/3).
def test_signguard_by_hand():
    g0 = [1.0, 1.0, 1.0, -1.0]
    x = t([g0, [1.0, 1.0, -1.0, 1.0], [2 * v for v in g0], [0.05 * v for v in g0], [-v for v in g0]])
    r = S.signguard(x, frac=1.0)
    assert r.info["median_norm"] == pytest.approx(2.0)
    assert r.info["norm_ok"].tolist() == [True, True, True, False, True]
    assert r.info["cluster_ok"].tolist() == [True, True, True, True, False]
    assert torch.allclose(r.info["features"][4], t([0.25, 0.0, 0.75]))
    assert r.info["selected"] == [0, 1, 2]
    assert torch.allclose(r.update, t([1.0, 1.0, 1 / 3, -1 / 3]))
    assert torch.allclose(r.weights, t([1 / 3, 1 / 3, 1 / 6, 0.0, 0.0]))


def test_signguard_drops_a_sign_flipped_update():
    """Xu et al.'s claim: a sign-flipping attacker keeps its norm (passes the norm filter) but its sign
    statistics leave the benign cluster."""
    x = 0.5 + torch.randn(10, 2000, generator=gen(2))
    x[2] = -x[2]
    r = S.signguard(x, generator=gen(0))
    assert bool(r.info["norm_ok"][2]) and not bool(r.info["cluster_ok"][2])
    assert 2 not in r.info["selected"] and r.weights[2] == 0
    # MeanShift with cluster_all=False may also leave out a benign straggler (here client 8: 63.5% positive
    # signs in its 200 sampled coordinates against 66-74% for the others); the majority stays
    assert len(r.info["selected"]) >= 8


def test_sign_features_count_zeros():
    x = t([[1.0, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(S.sign_features(x), t([[0.25, 0.5, 0.25], [0.0, 1.0, 0.0]]))
    assert torch.allclose(S.sign_features(x, torch.tensor([0, 2])), t([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]]))


# ------------------------------------------------------------------------------------------------ FLAME
# Updates (1, 0), (2, 0), (3, 0) (cosine distance 0 to each other) and (0, 1), (0, 5) (distance 1 to those):
# min cluster size floor(5/2) + 1 = 3 -> the first three form the admitted cluster, the pair is noise.
# Norms 1, 2, 3, 1, 5 -> median S_t = 2; (3, 0) is clipped to (2, 0); aggregate (1 + 2 + 2)/3 = 5/3.
def test_flame_by_hand_without_noise():
    x = t([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    r = S.flame(x, lam=0.0)
    assert r.info["admitted"] == [0, 1, 2] and r.info["median_norm"] == 2.0
    assert torch.allclose(r.update, t([5 / 3, 0.0]))
    assert torch.allclose(r.weights, t([1 / 3, 1 / 3, 2 / 9, 0.0, 0.0]))
    assert r.info["noise_std"] == 0.0


def test_flame_noise_is_lambda_times_median_norm_from_the_generator():
    x = rand(6, 20000, 0, dtype=F64)
    quiet = S.flame(x, lam=0.0)
    noisy = S.flame(x, lam=0.01, generator=gen(5))
    sigma = 0.01 * noisy.info["median_norm"]
    assert noisy.info["noise_std"] == pytest.approx(sigma)
    noise = noisy.update - quiet.update
    assert noise.std().item() == pytest.approx(sigma, rel=0.03)
    assert abs(noise.mean().item()) < 4 * sigma / math.sqrt(20000)
    assert torch.equal(noisy.update, S.flame(x, lam=0.01, generator=gen(5)).update)
    assert not torch.equal(noisy.update, S.flame(x, lam=0.01, generator=gen(6)).update)
    assert S.flame_lambda(3705.0, 0.01) == pytest.approx(math.sqrt(2 * math.log(125)) / 3705)


def test_flame_drops_a_planted_minority_cluster():
    """Nguyen et al.'s claim: models of a minority pointing elsewhere (here 3 of 10) are outliers of the
    majority cluster and are not aggregated, whatever their norm."""
    g = gen(3)
    d = 2000
    base, other = torch.randn(d, generator=g), torch.randn(d, generator=g)
    x = torch.stack([base + 0.3 * torch.randn(d, generator=g) for _ in range(7)]
                    + [5.0 * (other + 0.3 * torch.randn(d, generator=g)) for _ in range(3)])
    perm = torch.randperm(10, generator=g)
    r = S.flame(x[perm], lam=0.0)
    admitted = {int(perm[i]) for i in r.info["admitted"]}
    assert admitted and admitted <= set(range(7)) and len(admitted) >= 6
    assert all(r.weights[i] == 0 for i in range(10) if int(perm[i]) >= 7)


# -------------------------------------------------------------------------------------------- FoolsGold
# H0 = (1, 0, 0), H1 = (1/2, sqrt(3)/2, 0) (cos 1/2 with H0), H2 = (0, 0, 1) (orthogonal to both).
# v = (1/2, 1/2, 0); pardoning only rescales row 2, whose entries are 0. alpha = 1 - max cs = (1/2, 1/2, 1),
# / max -> (1/2, 1/2, 1); logit: ln(1) + 0.5 = 0.5 for clients 0 and 1, +inf -> 1 for client 2.
# Mean aggregate: (0.5 H0 + 0.5 H1 + H2) / 2 = (0.375, sqrt(3)/8, 0.5).
def test_foolsgold_by_hand():
    x = t([[1.0, 0.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0], [0.0, 0.0, 1.0]])
    r = S.foolsgold(x)
    assert torch.allclose(r.info["alpha"], t([0.5, 0.5, 1.0]))
    assert torch.allclose(r.weights, t([0.25, 0.25, 0.5]))
    assert torch.allclose(r.update, t([0.375, math.sqrt(3) / 8, 0.5]))
    s = S.foolsgold(x, aggregate="sum")
    assert torch.allclose(s.weights, t([0.5, 0.5, 1.0])) and torch.allclose(s.update, 2 * r.update)
    assert torch.allclose(S.foolsgold(x, kappa=2.0).info["alpha"], t([1.0, 1.0, 1.0]))  # 2 (0 + 0.5) = 1


def test_foolsgold_pardoning_by_hand():
    # H0 = (1, 0), H1 = (sqrt(3)/2, 1/2) (cos 30 deg), H2 = (0, 1): cs01 = sqrt(3)/2, cs12 = 1/2, cs02 = 0.
    # v = (sqrt(3)/2, sqrt(3)/2, 1/2); client 2 (v = 1/2) is pardoned: cs21 = 1/2 * (1/2)/(sqrt(3)/2) = 1/(2 sqrt 3).
    x = t([[1.0, 0.0], [math.sqrt(3) / 2, 0.5], [0.0, 1.0]])
    alpha, extra = S.foolsgold_alpha(x)
    assert torch.allclose(extra["v"], t([math.sqrt(3) / 2, math.sqrt(3) / 2, 0.5]))
    assert extra["cs"][2, 1].item() == pytest.approx(1 / (2 * math.sqrt(3)))
    assert extra["cs"][1, 2].item() == pytest.approx(0.5)  # v1 > v2: row 1 is not pardoned
    # raw alpha (1 - sqrt3/2, 1 - sqrt3/2, 1 - 1/(2 sqrt3)); normalised, clients 0 and 1 get
    # (1 - sqrt3/2)/(1 - 1/(2 sqrt3)) = 0.1883 < 0.3775: logit + 0.5 < 0 -> 0; client 2 -> 1
    assert alpha.tolist() == [0.0, 0.0, 1.0]


def test_foolsgold_down_weights_sybils_sending_identical_updates():
    """Fung et al.'s claim: sybils pushing the same update get (near) zero weight; honest clients keep theirs."""
    x = rand(10, 500, 4, dtype=F64)
    x[6:] = torch.randn(500, generator=gen(9), dtype=F64)  # 4 sybils, one update
    r = S.foolsgold(x)
    assert r.weights[6:].abs().max() == 0 and bool((r.weights[:6] > 0).all())
    assert torch.allclose(r.update, x[:6].mean(0))


def test_foolsgold_uses_the_history():
    # this round the two updates are orthogonal, but the history makes the two clients' totals identical
    x = t([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    no_history = S.foolsgold(x)
    assert bool((no_history.info["alpha"][:2] > 0).all())
    h = t([[10.0, 11.0], [11.0, 10.0], [0.0, -5.0]])
    r = S.foolsgold(x, history=h)
    assert torch.allclose(r.info["history"], h + x)
    assert r.info["alpha"][:2].tolist() == [0.0, 0.0] and r.info["alpha"][2] == 1.0
    with pytest.raises(ValueError, match="history must be a floating"):
        S.foolsgold(x, history=h[:2])


# ------------------------------------------------------------------------------- norm clipping / weak DP
def test_norm_clipping_by_hand_and_weak_dp_noise():
    # (3, 4) has norm 5 > M = 2.5: halved to (1.5, 2); (0, 1) is kept; mean (0.75, 1.5)
    x = t([[3.0, 4.0], [0.0, 1.0]])
    r = S.norm_clipping(x, M=2.5)
    assert torch.allclose(r.update, t([0.75, 1.5])) and torch.allclose(r.weights, t([0.25, 0.5]))
    assert r.info["n_clipped"] == 1
    big = rand(4, 40000, 1, dtype=F64)
    quiet = S.norm_clipping(big, M=3.0)
    noisy = S.norm_clipping(big, M=3.0, sigma=0.025, generator=gen(1))
    assert (noisy.update - quiet.update).std().item() == pytest.approx(0.025, rel=0.03)
    assert torch.equal(noisy.weights, quiet.weights)


# ----------------------------------------------------------------------------------------- pre-aggregators
# NNM, f = 1, 1-D points 0, 1, 3, 10: each averages its 3 nearest (itself included):
# 0 -> {0, 1, 3}, 1 -> {1, 0, 3}, 3 -> {3, 1, 0}, 10 -> {10, 3, 1} -> y = (4/3, 4/3, 4/3, 14/3)
def test_nnm_by_hand():
    y, mix = P.nnm(t([[0.0], [1.0], [3.0], [10.0]]), f=1)
    assert torch.allclose(y.flatten(), t([4 / 3, 4 / 3, 4 / 3, 14 / 3]))
    assert torch.allclose(mix.sum(1), torch.ones(4, dtype=F64))
    assert mix[3].tolist() == [0.0, 1 / 3, 1 / 3, 1 / 3]
    # an exact duplicate does not displace self
    y, mix = P.nnm(t([[0.0], [0.0], [5.0]]), f=2)
    assert torch.equal(mix, torch.eye(3, dtype=F64))


@needs_byzfl
@pytest.mark.parametrize("n,f,seed", [(10, 2, 0), (7, 3, 1), (12, 0, 2)])
def test_nnm_matches_byzfl(n, f, seed):
    x = rand(n, 25, seed)
    x[0] *= 20
    assert torch.allclose(P.nnm(x, f)[0], BZP.NNM(f=f)(x.clone()), atol=1e-6)


@needs_byzfl
@pytest.mark.parametrize("n,s,seed", [(10, 2, 0), (11, 3, 5), (7, 7, 2), (5, 9, 1)])
def test_bucketing_matches_byzfl_with_the_same_permutation(n, s, seed):
    """ByzFL draws its permutation from the global RNG (torch.randperm(n)); ours from a generator with the same
    seed gives the same permutation, hence the same buckets (the last one partial when s does not divide n)."""
    x = rand(n, 16, seed)
    torch.manual_seed(seed)
    theirs = BZP.Bucketing(s=s)(x.clone())
    ours, mix = P.bucketing(x, s, generator=gen(seed))
    assert ours.shape == theirs.shape == (math.ceil(n / s), 16)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(mix.sum(1), torch.ones(len(mix), dtype=F64))
    assert torch.equal((mix > 0).sum(0), torch.ones(n, dtype=torch.long))  # every client in exactly one bucket


@needs_byzfl
@pytest.mark.parametrize("n,f,seed", [(12, 2, 0), (15, 3, 4)])
def test_nnm_then_multikrum_matches_byzfl(n, f, seed):
    """Allouah et al.'s recipe NNM -> multi-Krum, ours vs ByzFL's NNM(f) then MultiKrum(f). ByzFL's MultiKrum(f')
    averages the n - f' updates of lowest score, scores over n - f' - 1 neighbours (ours: f = f' - 1, m = n - f';
    see test_aggregators.test_multikrum_matches_byzfl)."""
    from robustfl.aggregation import aggregators as A

    x = rand(n, 30, seed)
    x[:f] = 5.0 + rand(f, 30, seed + 100)
    mixed, _ = P.nnm(x, f)
    ours = A.krum(mixed, f - 1, m=n - f).update
    theirs = BZ.MultiKrum(f=f)(BZP.NNM(f=f)(x.clone()))
    assert torch.allclose(ours, theirs, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
RULES = {
    "geomed": lambda x: S.geomed(x),
    "centered_clipping": lambda x: S.centered_clipping(x),
    "dnc": lambda x: S.dnc(x, 1),
    "signguard": lambda x: S.signguard(x),
    "flame": lambda x: S.flame(x),
    "foolsgold": lambda x: S.foolsgold(x),
    "norm_clipping": lambda x: S.norm_clipping(x),
    "nnm": lambda x: P.nnm(x, 1),
    "bucketing": lambda x: P.bucketing(x),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("bad,msg", [
    (torch.zeros(5), "2-D tensor"), (torch.zeros(4, 3, 2), "2-D tensor"),
    (torch.zeros(4, 3, dtype=torch.int64), "dtype"), (torch.zeros(0, 3), "at least one client"),
    (torch.zeros(4, 0), "at least one coordinate"), ([[1.0]], "torch.Tensor"),
])
def test_malformed_updates_are_rejected(rule, bad, msg):
    with pytest.raises(ValueError, match=msg):
        RULES[rule](bad)


@pytest.mark.parametrize("rule", RULES)
def test_non_finite_updates_are_rejected_naming_the_clients(rule):
    """The server drops non-finite clients before the rule; a rule handed one raises (never filters silently)."""
    x = rand(6, 8, 0)
    x[2, 1] = float("nan")
    x[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite .* client indices \[2, 4\]"):
        RULES[rule](x)


def _with_huge(row: int = 3) -> torch.Tensor:
    x = 0.01 * rand(10, 256, 0)
    v = torch.randn(256, generator=gen(1))
    x[row] = v / v.norm() * 1e30
    return x


@pytest.mark.parametrize("rule", ["dnc", "signguard", "flame", "norm_clipping"])
def test_a_huge_update_does_not_move_the_robust_rules(rule):
    """A finite 1e30-norm update among ten of norm ~0.16: float64 norms keep everything finite, and these
    rules keep the aggregate at the benign scale (centered clipping: at most tau/n, tested above)."""
    x = _with_huge()
    r = RULES[rule](x) if rule != "norm_clipping" else S.norm_clipping(x, M=0.2)
    assert torch.isfinite(r.update).all() and torch.isfinite(r.weights).all()
    assert r.update.norm() < 1.0


def test_geomed_budget_and_start_against_a_huge_update():
    """RFA with the paper's budget R = 3 from the mean (the authors' code's start): each Weiszfeld step cuts the
    pull of a far outlier by about n - 1 = 9, so a 1e30 update still moves the aggregate to ~1e30 / 9^3 / 10.
    Started at zero (ByzFL's start) the outlier's weight is ~1e-31 from the first step."""
    x = _with_huge()
    norms = [S.geomed(x, iters=r, tol=0.0).update.double().norm().item() for r in (1, 2, 3)]
    assert norms[0] > 5 * norms[1] > 25 * norms[2] and norms[2] < 1e30 / 9 ** 3
    r = S.geomed(x, init="zero")
    assert torch.isfinite(r.update).all() and r.update.norm() < 1.0 and r.weights[3] < 1e-20


@pytest.mark.parametrize("call,msg", [
    (lambda x: S.geomed(x, nu=0.0), "nu must be > 0"),
    (lambda x: S.geomed(x, iters=0), "iters must be an int >= 1"),
    (lambda x: S.geomed(x, tol=-1.0), "tol must be >= 0"),
    (lambda x: S.geomed(x, init="median"), "init must be 'mean' or 'zero'"),
    (lambda x: S.centered_clipping(x, tau=0.0), "tau must be > 0"),
    (lambda x: S.centered_clipping(x, tau=float("inf")), "tau must be a finite number"),
    (lambda x: S.centered_clipping(x, centre=torch.zeros(3)), "centre must have d=8"),
    (lambda x: S.dnc(x, f=-1), "f must be an int >= 0"),
    (lambda x: S.dnc(x, f=1, b=0), "b must be an int >= 1"),
    (lambda x: S.dnc(x, f=1, niters=1.5), "niters must be an int"),
    (lambda x: S.dnc(x, f=3, c=2.0), r"floor\(c\*f\) = 6 .* n=6"),
    (lambda x: S.signguard(x, lower=2.0, upper=1.0), "upper must be >= lower"),
    (lambda x: S.signguard(x, frac=0.0), "frac must be > 0"),
    (lambda x: S.signguard(x, frac=1.5), "frac must be <= 1"),
    (lambda x: S.flame(x, lam=-0.1), "lam must be >= 0"),
    (lambda x: S.foolsgold(x, kappa=0.0), "kappa must be > 0"),
    (lambda x: S.foolsgold(x, aggregate="median"), "aggregate must be 'mean' or 'sum'"),
    (lambda x: S.norm_clipping(x, M=0.0), "M must be > 0"),
    (lambda x: S.norm_clipping(x, sigma=-1.0), "sigma must be >= 0"),
    (lambda x: S.dnc(x, 1, generator=42), "generator must be a torch.Generator"),
    (lambda x: P.nnm(x, 6), "needs f < n"),
    (lambda x: P.bucketing(x, 0), "s must be an int >= 1"),
    (lambda x: S.flame_lambda(0.0, 0.01), "epsilon must be > 0"),
    (lambda x: S.flame_lambda(1.0, 1.0), "delta must be < 1"),
])
def test_bad_parameters_name_the_parameter(call, msg):
    with pytest.raises(ValueError, match=msg):
        call(rand(6, 8, 0))


# ----------------------------------------------------------------------------------- shared properties
DETERMINISTIC = {
    "geomed": lambda x: S.geomed(x),
    "centered_clipping": lambda x: S.centered_clipping(x, tau=0.5, iters=2),
    "dnc_all_coordinates": lambda x: S.dnc(x, 1, b=10 ** 6),
    "flame_no_noise": lambda x: S.flame(x, lam=0.0),
    "foolsgold": lambda x: S.foolsgold(x),
    "norm_clipping": lambda x: S.norm_clipping(x, M=1.0),
    "signguard_all_coordinates": lambda x: S.signguard(x, frac=1.0),
}


@pytest.mark.parametrize("rule", DETERMINISTIC)
def test_permutation_equivariance_and_weights_reproduce_the_update(rule):
    x = rand(9, 40, 5, dtype=F64)
    x[1] += 3.0
    r = DETERMINISTIC[rule](x)
    extra = r.info.get("centre_weight", 0.0) * torch.zeros(40, dtype=F64)  # centre 0
    assert_weights_reproduce(r, x, extra)
    perm = torch.randperm(9, generator=gen(2))
    rp = DETERMINISTIC[rule](x[perm])
    assert torch.allclose(rp.update, r.update, atol=1e-9)
    assert torch.allclose(rp.weights, r.weights[perm], atol=1e-12)


@pytest.mark.parametrize("rule", DETERMINISTIC)
def test_identical_updates(rule):
    """n copies of one update: every rule returns it, except FoolsGold, for which all n are sybils of each
    other (weight 0 each: the zero update), and the clipping rules, which clip it to the bound."""
    x = torch.ones(6, 5, dtype=F64) * 0.1
    r = DETERMINISTIC[rule](x)
    if rule == "foolsgold":
        assert torch.equal(r.update, torch.zeros(5, dtype=F64)) and float(r.weights.sum()) == 0
    elif rule == "centered_clipping":  # centred at 0, clipped to tau = 0.5 > norm 0.22: the update itself
        assert torch.allclose(r.update, x[0])
    else:
        assert torch.allclose(r.update, x[0])


def test_float32_input_keeps_its_dtype_and_device():
    x = rand(8, 30, 0)
    for name, rule in {**DETERMINISTIC, "dnc": lambda u: S.dnc(u, 1, b=5), "flame": S.flame}.items():
        r = rule(x)
        assert r.update.dtype == torch.float32 and r.update.device == x.device, name
        assert r.weights.dtype == F64, name


def test_signguard_small_quantile_with_few_clients_still_runs():
    # int(5 * 0.1) = 0 neighbours would make scikit-learn's estimate_bandwidth fail: at least one is used
    r = S.signguard(rand(5, 200, 3), quantile=0.1, generator=gen(0))
    assert torch.isfinite(r.update).all() and len(r.info["labels"]) == 5
