"""The engine: everything that trains or crafts many models at once, behind one seam.

The federated-learning code (robustfl.fl, robustfl.attacks, robustfl.aggregation) calls only what this
module exports, with an explicit, immutable :class:`EngineOptions`:

* :func:`train_clients` -- local training of n clients (Section 3.1 step 2), optionally from one
  starting model per client (several runs packed into one call: :func:`concat_plans`);
* :func:`batch_plan` / :class:`BatchPlan` -- the clients' mini-batches, drawn from a run's generator;
* :func:`train_single`, :func:`evaluate`, :func:`model_plrs` -- the server's own training, the test
  metrics, the PLRs of n models (Algorithm 1 lines 4-5);
* :func:`prepare_inputs`, :func:`masked_ce` -- inputs as the models take them, the masked cross-entropy;
* :class:`ModelRows`, :func:`model_forward` -- k models as the rows of one matrix, for loops that craft
  several models at once (the backdoor attackers'), one at a time or on a stacked layout.

Inside: robustfl.engine.train (the sequential reference and the vectorised engine), stacked (the
forward pass on stacked parameters), triton_* (the kernels), graphs (CUDA graphs), adam (Adam on
stacked tensors), rows (:class:`ModelRows`), options (:class:`EngineOptions` and what ``auto`` resolves to).
"""
from robustfl.engine.common import masked_ce, prepare_inputs
from robustfl.engine.options import EngineOptions
from robustfl.engine.rows import ModelRows, model_forward
from robustfl.engine.train import (
    BatchPlan,
    batch_plan,
    clear_graph_cache,
    concat_plans,
    evaluate,
    model_plrs,
    train_clients,
    train_single,
)

#: the sequential reference engine (one model and one torch.optim.Adam per client)
SEQUENTIAL = EngineOptions(kind="sequential")

__all__ = ["SEQUENTIAL", "BatchPlan", "EngineOptions", "ModelRows", "batch_plan", "clear_graph_cache", "concat_plans",
           "evaluate", "masked_ce", "model_forward", "model_plrs", "prepare_inputs", "train_clients", "train_single"]
