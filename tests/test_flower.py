"""robustfl's defenses as Flower strategies (robustfl.flower): flatten/unflatten, a strategy for every
registered defense, aggregate_fit against the registry's rules and hand-worked numbers, and a real Flower
simulation (flwr's Ray engine) in which FLARE gives a poisoned client near-zero weight and FedAvg does not."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported: no usage reports from tests

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason='Flower is an optional extra: pip install "robustfl[flower]"')

from flwr.client import NumPyClient  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402

from robustfl import engine  # noqa: E402
from robustfl.aggregation.defenses import DEFENSES, ServerContext  # noqa: E402
from robustfl.data.datasets import load_digits  # noqa: E402
from robustfl.data.serversets import aux_set, root_set  # noqa: E402
from robustfl.fl.simulate import root_update  # noqa: E402
from robustfl.flower import (  # noqa: E402
    DefenseStrategy,
    flatten_arrays,
    load_arrays,
    model_arrays,
    unflatten_arrays,
)
from robustfl.models import build_model  # noqa: E402
from robustfl.params import model_to_flat  # noqa: E402


def _digits_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("digits_cnn", 10, 1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):
    return load_digits({}, tmp_path_factory.mktemp("digits"))


class _Proxy:
    """What aggregate_fit reads of a ClientProxy: its cid."""

    def __init__(self, cid: str) -> None:
        self.cid = cid


def _results(arrays_per_client: list[list[np.ndarray]], cids: list[str] | None = None):
    cids = cids or [str(i) for i in range(len(arrays_per_client))]
    return [(_Proxy(c), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(a), 10, {"who": c}))
            for c, a in zip(cids, arrays_per_client)]


# ------------------------------------------------------------------------------------- flatten / unflatten
def test_flatten_is_c_order_one_array_after_the_other() -> None:
    arrays = [np.array([[1, 2], [3, 4]], np.float32), np.array(5, np.float32), np.array([6, 7], np.float32)]
    flat, layout = flatten_arrays(arrays)
    assert flat.tolist() == [1, 2, 3, 4, 5, 6, 7] and flat.dtype == torch.float32
    assert layout.shapes == ((2, 2), (), (2,)) and layout.dim == 7
    back = unflatten_arrays(flat * 10, layout)
    assert [b.shape for b in back] == [(2, 2), (), (2,)]
    assert back[0].tolist() == [[10, 20], [30, 40]] and float(back[1]) == 50 and back[2].tolist() == [60, 70]


def test_flatten_keeps_each_dtype_and_promotes_to_float64_only_when_needed() -> None:
    arrays = [np.arange(3, dtype=np.float16), np.array([0.1, 0.2], np.float64)]
    flat, layout = flatten_arrays(arrays)
    assert flat.dtype == torch.float64 and flat[3].item() == 0.1
    back = unflatten_arrays(flat, layout)
    assert back[0].dtype == np.float16 and back[1].dtype == np.float64
    assert np.array_equal(back[0], arrays[0]) and np.array_equal(back[1], arrays[1])


def test_flatten_and_unflatten_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="dtype int64"):
        flatten_arrays([np.zeros(2, np.float32), np.zeros(1, np.int64)])
    with pytest.raises(ValueError, match="no arrays"):
        flatten_arrays([])
    _, layout = flatten_arrays([np.zeros((2, 3), np.float32)])
    with pytest.raises(ValueError, match=r"needs \(6,\)"):
        unflatten_arrays(torch.zeros(5), layout)


def test_model_arrays_follow_robustfls_flat_order() -> None:
    model = _digits_model()
    flat, _ = flatten_arrays(model_arrays(model))
    assert torch.equal(flat, model_to_flat(model))
    other = build_model("digits_cnn", 10, 1)
    load_arrays(other, model_arrays(model))
    assert torch.equal(model_to_flat(other), model_to_flat(model))
    with pytest.raises(ValueError, match="array 0 has shape"):
        load_arrays(other, [a.T for a in model_arrays(model)])
    with pytest.raises(ValueError, match="arrays, the model has"):
        load_arrays(other, model_arrays(model)[:2])


# --------------------------------------------------------------------------------------------- construction
def test_every_registered_defense_builds_a_strategy(digits) -> None:
    aux = aux_set(digits, m=10)
    root = root_set(digits, size=20, exclude=aux.indices)
    names = DEFENSES.names()
    assert {"fedavg", "flare", "fltrust", "krum", "median"} <= set(names)
    for name in names:
        s = DefenseStrategy(name, model_fn=_digits_model, aux=(aux.x, aux.y), root=(root.x, root.y))
        assert s.defense == name and s.defense_fn is DEFENSES.get(name)


def test_construction_errors_name_the_problem(digits) -> None:
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        DefenseStrategy("nope")
    with pytest.raises(ValueError, match="flare.*model_fn.*aux"):
        DefenseStrategy("flare", model_fn=_digits_model)
    with pytest.raises(ValueError, match="fltrust.*root"):
        DefenseStrategy("fltrust", model_fn=_digits_model)
    with pytest.raises(ValueError, match="unknown params"):
        DefenseStrategy("geomed", defense_params={"nope": 1})
    with pytest.raises(ValueError, match="f .* int >= 0"):
        DefenseStrategy("krum", f=-1)
    with pytest.raises(ValueError, match="f .* int >= 0"):
        DefenseStrategy("krum", defense_params={"f": 1.5})
    with pytest.raises(ValueError, match="aux: y must be"):
        DefenseStrategy("flare", model_fn=_digits_model, aux=(digits.x_test[:5], digits.y_test[:4]))


# -------------------------------------------------------------------------------------------- aggregate_fit
def _strategy_round(strategy: DefenseStrategy, global_arrays, client_arrays, cids=None):
    strategy.configure_fit(1, ndarrays_to_parameters(global_arrays), _NoClients())
    params, metrics = strategy.aggregate_fit(1, _results(client_arrays, cids), [])
    return parameters_to_ndarrays(params), metrics


class _NoClients:
    """configure_fit samples from the client manager; no client is needed to record the global parameters."""

    def num_available(self) -> int:
        return 0

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion=None):
        return []


def test_median_and_fedavg_by_hand() -> None:
    g = [np.array([1.0, 1.0], np.float32), np.array([0.0], np.float32)]
    clients = [[np.array([2.0, 1.0], np.float32), np.array([1.0], np.float32)],
               [np.array([3.0, 0.0], np.float32), np.array([-1.0], np.float32)],
               [np.array([101.0, 1.0], np.float32), np.array([0.5], np.float32)]]
    # updates (rows): [1, 0, 1], [2, -1, -1], [100, 0, 0.5]; median per coordinate [2, 0, 0.5]; mean [34.333, -1/3, 1/6]
    out, metrics = _strategy_round(DefenseStrategy("median"), g, clients)
    assert out[0].tolist() == [3.0, 1.0] and out[1].tolist() == [0.5]
    assert metrics["defense"] == "median" and metrics["n_kept"] == 3
    out, metrics = _strategy_round(DefenseStrategy("fedavg"), g, clients)
    np.testing.assert_allclose(out[0], [1 + 103 / 3, 1 - 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.5 / 3], rtol=1e-6)
    assert [metrics[f"weight/{c}"] for c in "012"] == pytest.approx([1 / 3] * 3)


def test_rows_are_sorted_by_cid_and_nonfinite_clients_dropped() -> None:
    g = [np.zeros(3, np.float32)]
    clients = [[np.array([0.0, 0.0, 5.0], np.float32)], [np.array([np.nan, 0.0, 0.0], np.float32)],
               [np.array([1.0, 1.0, 1.0], np.float32)], [np.array([1.0, 1.2, 1.0], np.float32)]]
    s = DefenseStrategy("krum", f=0)
    out, metrics = _strategy_round(s, g, clients, cids=["d", "b", "a", "c"])
    rec = s.rounds[-1]
    assert rec.cids == ["a", "b", "c", "d"] and rec.kept == [0, 2, 3] and metrics["n_kept"] == 3
    assert metrics["weight/b"] == 0.0  # NaN update: screened out before the rule
    # Krum with f = 0 over the kept [1,1,1], [1,1.2,1], [0,0,5]: the first (lower index among the tied pair)
    assert metrics["weight/a"] == 1.0 and metrics["weight/c"] == 0.0 and metrics["weight/d"] == 0.0
    assert out[0].tolist() == [1.0, 1.0, 1.0]
    assert [m["who"] for m in rec.client_metrics] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("name", DEFENSES.names())
def test_aggregate_is_the_registered_rule(name: str, digits) -> None:
    """For every defense, aggregate_fit's new parameters are theta + the registry rule's aggregate on the
    clients' updates (FLARE: PLRs on the aux set from the received models; FLTrust: robustfl's root update)."""
    model = _digits_model()
    aux = aux_set(digits, m=10)
    root = root_set(digits, size=20, exclude=aux.indices)
    theta = model_to_flat(model)
    gen = torch.Generator().manual_seed(3)
    n = 7
    updates = 0.01 * torch.randn(n, theta.numel(), generator=gen)
    updates[-1] *= -20  # one outlier
    spec_layout = flatten_arrays(model_arrays(model))[1]
    clients = [unflatten_arrays(theta + u, spec_layout) for u in updates]
    s = DefenseStrategy(name, model_fn=_digits_model, aux=(aux.x, aux.y), root=(root.x, root.y),
                        defense_params={"pretrain": False} if name == "flare" else None, seed=5)
    out, metrics = _strategy_round(s, model_arrays(model), clients)
    # the same round by hand with robustfl's pieces
    x_aux = torch.as_tensor(aux.x)
    received = torch.stack([flatten_arrays(c)[0] for c in clients]) - theta
    ctx = ServerContext(
        n_clients=n, f=1, params={}, generator=torch.Generator().manual_seed(5 + 104729), client_ids=list(range(n)),
        plr_fn=lambda u: engine.model_plrs(model, theta + received, x_aux),
        server_update_fn=lambda: root_update(model, theta, torch.as_tensor(root.x), torch.as_tensor(root.y),
                                             epochs=1, batch_size=32, lr=1e-3,
                                             generator=torch.Generator().manual_seed(5 * 1_000_003 + 1)))
    ref = DEFENSES.get(name)(received, ctx)
    torch.testing.assert_close(flatten_arrays(out)[0], theta + ref.update, rtol=1e-5, atol=1e-6)
    assert [metrics[f"weight/{i}"] for i in range(n)] == pytest.approx(ref.weights.tolist(), abs=1e-9)
    assert s.rounds[-1].weights == pytest.approx(ref.weights.tolist(), abs=1e-9)


def test_flare_pretrains_the_initial_model_on_the_aux_set(digits) -> None:
    aux = aux_set(digits, m=10)
    init = model_arrays(_digits_model())
    s = DefenseStrategy("flare", model_fn=_digits_model, aux=(aux.x, aux.y),
                        initial_parameters=ndarrays_to_parameters(init))
    got = flatten_arrays(parameters_to_ndarrays(s.initialize_parameters(None)))[0]
    model = _digits_model()
    engine.train_single(model, torch.as_tensor(aux.x), torch.as_tensor(aux.y), epochs=1, batch_size=32, lr=1e-3,
                        generator=torch.Generator().manual_seed(15485863))
    torch.testing.assert_close(got, model_to_flat(model))
    off = DefenseStrategy("flare", model_fn=_digits_model, aux=(aux.x, aux.y), defense_params={"pretrain": False},
                          initial_parameters=ndarrays_to_parameters(init))
    assert torch.equal(flatten_arrays(parameters_to_ndarrays(off.initialize_parameters(None)))[0],
                       flatten_arrays(init)[0])


# ---------------------------------------------------------------------------------- a real Flower simulation
N_CLIENTS, POISONED, ROUNDS = 5, 4, 2


class _DigitsClient(NumPyClient):
    """A Flower client training robustfl's digits model with robustfl's engine on its shard; the client with
    partition id POISONED sends ``theta - 10 * delta`` (its update flipped and scaled 10x)."""

    def __init__(self, pid: int, x: np.ndarray, y: np.ndarray) -> None:
        self.pid, self.x, self.y = pid, torch.tensor(x), torch.tensor(y)

    def fit(self, parameters, config):
        torch.set_num_threads(1)
        model = load_arrays(_digits_model(), parameters)
        theta = model_to_flat(model)
        delta = engine.train_clients(model, theta, self.x, self.y, [torch.arange(len(self.y))], epochs=1,
                                     batch_size=32, lr=1e-3, options=engine.SEQUENTIAL,
                                     generator=torch.Generator().manual_seed(self.pid))[0]
        if self.pid == POISONED:
            delta = -10.0 * delta
        return unflatten_arrays(theta + delta, flatten_arrays(parameters)[1]), len(self.y), {"partition": self.pid}


def _simulate(strategy: DefenseStrategy, digits) -> None:
    import ray.cloudpickle
    from flwr.client import ClientApp
    from flwr.common import Context
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    # the ClientApp travels to Ray's worker processes by value (this test module is not importable there)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shards = np.array_split(np.random.default_rng(0).permutation(len(digits.y_train))[:600], N_CLIENTS)
    data = [(digits.x_train[s], digits.y_train[s]) for s in shards]

    def client_fn(context: Context):
        pid = int(context.node_config["partition-id"])
        return _DigitsClient(pid, *data[pid]).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=N_CLIENTS, backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


@pytest.mark.slow
def test_flower_simulation_flare_zeroes_the_poisoned_client_fedavg_does_not(digits) -> None:
    pytest.importorskip("ray", reason='Flower\'s simulation engine needs Ray: pip install "flwr[simulation]"')
    aux = aux_set(digits, m=10)
    common = dict(fraction_evaluate=0.0, min_fit_clients=N_CLIENTS, min_available_clients=N_CLIENTS,
                  initial_parameters=ndarrays_to_parameters(model_arrays(_digits_model())))
    flare = DefenseStrategy("flare", model_fn=_digits_model, aux=(aux.x, aux.y), **common)
    fedavg = DefenseStrategy("fedavg", **common)
    for strategy in (flare, fedavg):
        _simulate(strategy, digits)
        assert [r.round for r in strategy.rounds] == list(range(1, ROUNDS + 1))
    for rec in flare.rounds + fedavg.rounds:
        assert len(rec.cids) == N_CLIENTS and rec.kept == list(range(N_CLIENTS))
        assert sorted(m["partition"] for m in rec.client_metrics) == list(range(N_CLIENTS))
    for rec in flare.rounds:
        w = {m["partition"]: rec.weights[k] for k, m in enumerate(rec.client_metrics)}
        assert w[POISONED] < 0.05, w  # FLARE: near-zero trust for the poisoned client
        assert sum(w.values()) == pytest.approx(1.0)
    for rec in fedavg.rounds:
        w = {m["partition"]: rec.weights[k] for k, m in enumerate(rec.client_metrics)}
        assert w[POISONED] == pytest.approx(1 / N_CLIENTS), w
