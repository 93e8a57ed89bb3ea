"""Benchmark: the same FedAvg run through Flower's simulation engine and through robustfl, side by side in
one process: fmnist-shaped random data (28x28x1, 10 classes), the paper's fmnist network (``fmnist_cnn``,
Appendix C Table 6), n clients x ``--samples`` images each (robustfl's IID partition, the same shards on
both sides), ``--rounds`` rounds of ``--epochs`` local epochs of Adam (lr 1e-3, batch 64), FedAvg, the
global model evaluated on 200 test images after every round.

* robustfl: :func:`robustfl.fl.experiment.run_cell` (data load to ``run.json``) with the sequential engine
  (one model and one ``torch.optim.Adam`` per client, one after the other) and with the vectorised engine
  (all clients at once; on the CPU its ``vmap`` path).
* Flower: ``flwr.simulation.run_simulation`` (its Ray engine, one actor per CPU, one CPU per client) with
  Flower's own ``FedAvg`` strategy; each ``NumPyClient`` trains with robustfl's sequential loop on its shard
  (the same per-client Adam steps as the robustfl sequential run), the server evaluates with
  ``evaluate_fn``. ``startup_s`` is the time to the first (round-0) evaluation (Ray started); the actors start
  within round 1.

    python bench/bench_flower.py --out bench/results/flower_vs_robustfl_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported: no usage reports

import numpy as np
import torch

from robustfl import engine
from robustfl.config import RunConfig
from robustfl.data.datasets import load_prepared, prepare
from robustfl.data.partition import load_partition
from robustfl.fl.experiment import build_partition, run_cell, server_split
from robustfl.io import atomic_write_json
from robustfl.models import build_model
from robustfl.params import model_to_flat

try:  # run as `python bench/bench_flower.py` from the repository root
    from bench_engine import result_header
    from bench_run import register_random
except ImportError:  # pragma: no cover - imported as bench.bench_flower
    from bench.bench_engine import result_header
    from bench.bench_run import register_random

BATCH, LR = 64, 1e-3
#: test images, evaluated after every round (robustfl's server split draws 100 backdoor-evaluation images
#: from them, so not fewer)
TEST_IMAGES = 200


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fmnist_cnn", 10, 1)


def run_flower(x: np.ndarray, y: np.ndarray, shards: list[np.ndarray], x_test: np.ndarray, y_test: np.ndarray,
               rounds: int, epochs: int, cpus: int) -> dict:
    """One FedAvg run through Flower's Ray simulation; returns the timings and the final test accuracy."""
    import flwr
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from robustfl.flower import flatten_arrays, load_arrays, model_arrays, unflatten_arrays

    class Client(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):  # noqa: ANN001, ANN201
            model = load_arrays(build_model("fmnist_cnn", 10, 1), parameters)
            theta = model_to_flat(model)
            xs, ys = torch.tensor(x[shards[self.pid]]), torch.tensor(y[shards[self.pid]])
            delta = engine.train_clients(model, theta, xs, ys, [torch.arange(len(ys))], epochs=epochs,
                                         batch_size=BATCH, lr=LR, options=engine.SEQUENTIAL,
                                         generator=torch.Generator().manual_seed(self.pid))[0]
            return (unflatten_arrays(theta + delta, flatten_arrays(parameters)[1]), len(ys),
                    {"torch_threads": torch.get_num_threads()})

    evals: list[tuple[int, float, float]] = []
    threads: set[int] = set()

    def fit_metrics(metrics):  # noqa: ANN001, ANN202
        threads.update(int(m["torch_threads"]) for _, m in metrics)
        return {}

    xt, yt = torch.tensor(x_test), torch.tensor(y_test)
    eval_model = _model()

    def evaluate_fn(server_round, parameters, config):  # noqa: ANN001, ANN202
        load_arrays(eval_model, parameters)
        acc, loss = engine.evaluate(eval_model, xt, yt)
        evals.append((server_round, time.perf_counter(), acc))
        return loss, {"accuracy": acc}

    def client_fn(context: Context):  # noqa: ANN202
        return Client(int(context.node_config["partition-id"])).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(fraction_evaluate=0.0, min_fit_clients=len(shards), min_available_clients=len(shards),
                          evaluate_fn=evaluate_fn, fit_metrics_aggregation_fn=fit_metrics,
                          initial_parameters=ndarrays_to_parameters(model_arrays(_model())))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    t0 = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=len(shards), backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})
    wall = time.perf_counter() - t0
    t_init = evals[0][1]
    return {"impl": "flower", "engine": f"flwr.simulation.run_simulation (ray, {cpus} CPUs, 1 per client)",
            "flwr": flwr.__version__, "end_to_end_s": wall, "startup_s": t_init - t0,
            "rounds_s": evals[-1][1] - t_init, "per_round_s": [b[1] - a[1] for a, b in zip(evals, evals[1:])],
            "test_acc": evals[-1][2], "client_torch_threads": sorted(threads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--samples", type=int, default=64, help="images per client")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs Ray may use (clients in parallel)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process (robustfl's runs); default torch's. Flower's actors run "
                         "one thread each (Ray sets OMP_NUM_THREADS to an actor's CPUs)")
    ap.add_argument("--note", default="", help="recorded in the result (e.g. what else the machine ran)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    dev = torch.device("cpu")  # the comparison is CPU-only (Flower's clients here train on the CPU)
    tmp = Path(tempfile.mkdtemp(prefix="bench_flower-"))
    base = dict(dataset="fmnist", n_clients=a.clients, n_attackers=0, attack="none", defense="fedavg",
                rounds=a.rounds, local_epochs=a.epochs, batch_size=BATCH, lr=LR, device="cpu",
                checkpoint_every=0, snapshot_round=None)
    # the server's held-out sets (backdoor targets, aux, root) come out of the training images first: size the
    # random set so that the clients' pool is exactly clients x samples
    cfg0 = RunConfig(**base, engine={"kind": "sequential"})
    probe_key = register_random("fmnist", n_train=a.clients * a.samples + 300, n_test=TEST_IMAGES)
    probe = load_prepared(prepare(probe_key, {}, tmp / "probe"))
    reserved = len(server_split(probe, cfg0).reserved)
    key = register_random("fmnist", n_train=a.clients * a.samples + reserved, n_test=TEST_IMAGES)
    data_dir = prepare(key, {}, tmp / "data")
    part = tmp / "partition.npz"
    build_partition(data_dir, cfg0, part)
    shards, _ = load_partition(part)
    ds = load_prepared(data_dir)
    res = result_header(dev, note=a.note, load_average_at_start=os.getloadavg(), torch_threads=torch.get_num_threads(),
                        clients=a.clients,
                        samples_per_client=[len(s) for s in shards], rounds=a.rounds, local_epochs=a.epochs,
                        batch_size=BATCH, lr=LR, test_images=TEST_IMAGES, model="fmnist_cnn",
                        d=int(model_to_flat(_model()).numel()), data="random uint8 28x28x1, 10 classes")
    # warm-up, not timed: the first convolutions and Adam steps in this process (each Flower actor pays its own)
    wm = _model()
    for kind in ("sequential", "vectorised"):
        engine.train_clients(wm, model_to_flat(wm), torch.tensor(np.array(ds.x_train[:BATCH])),
                             torch.tensor(np.array(ds.y_train[:BATCH])), [torch.arange(BATCH)] * 2, epochs=1,
                             batch_size=BATCH, lr=LR, options=engine.EngineOptions(kind=kind),
                             generator=torch.Generator().manual_seed(0))
    for kind in ("sequential", "vectorised"):
        cfg = RunConfig(**base, engine={"kind": kind})
        ends: list[float] = []
        t = time.perf_counter()
        final = run_cell(cfg, data_dir, part, tmp / f"run_{kind}",
                         on_round=lambda _row: ends.append(time.perf_counter()))
        wall = time.perf_counter() - t
        row = {"impl": "robustfl", "engine": final["engine"], "end_to_end_s": wall, "sim_wall_s": final["sim_wall_s"],
               "per_round_s": [b - a for a, b in zip([t + wall - final["sim_wall_s"], *ends], ends)],
               "test_acc": final["test_acc"], **{k: v for k, v in final.items() if k.startswith("engine_")}}
        print(json.dumps(row), flush=True)
        res["results"].append(row)
    row = run_flower(np.array(ds.x_train), np.array(ds.y_train), shards, np.array(ds.x_test), np.array(ds.y_test),
                     a.rounds, a.epochs, a.cpus)
    print(json.dumps(row), flush=True)
    res["results"].append(row)
    res["versions"]["flwr"] = row["flwr"]
    import ray

    res["versions"]["ray"] = ray.__version__
    res["load_average_at_end"] = os.getloadavg()
    if a.out:
        atomic_write_json(a.out, res)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
