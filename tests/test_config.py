"""RunConfig: impossible settings fail with a message naming the key."""
from __future__ import annotations

import pytest

from robustfl.config import RunConfig


@pytest.mark.parametrize("kw, key", [
    ({"n_clients": 10, "n_attackers": 5, "attack": "krum_untargeted"}, "n_attackers"),  # f >= n/2
    ({"attack": "krum_untargeted", "n_attackers": 0}, "n_attackers"),
    ({"aux_size": 1}, "aux_size"),  # the unbiased MMD needs m >= 2
    ({"rounds": 3, "snapshot_round": 5}, "snapshot_round"),
    ({"engine": "fast"}, "engine"),
    ({"engine": {"kind": "fast"}}, "engine"),
    ({"engine": {"conv": "winograd"}}, "engine"),
    ({"engine": {"conv": "vmap", "cuda_graph": True}}, "engine"),
    ({"engine": {"graph": True}}, "engine"),
    ({"lr": 0.0}, "lr"),
    ({"partition": "shards"}, "partition"),
    ({"aux_class": -1}, "aux_class"),
    ({"aux_class": "1"}, "aux_class"),
])
def test_impossible_settings_name_the_key(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=repr(key)):
        RunConfig(**kw)


def test_unknown_key_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="n_client"):
        RunConfig.from_dict({"n_client": 10})


def test_defaults_follow_section_6_1() -> None:
    c = RunConfig(dataset="fmnist")
    assert (c.n_clients, c.rounds, c.local_epochs, c.lr, c.aux_size) == (10, 20, 5, 1e-3, 10)
    assert c.effective_batch_size == 64 and RunConfig(dataset="cifar10").effective_batch_size == 32
    assert c.engine == {"kind": "auto", "conv": "auto", "cuda_graph": None} and RunConfig.from_dict(c.to_dict()) == c
    assert RunConfig(engine={"conv": "auto"}) == RunConfig()  # missing engine keys take their defaults


def test_bulyan_needs_n_at_least_4f_plus_3():
    """El Mhamdi et al. 2018: n >= 4f + 3; f is the cell's attackers unless defense_params sets it."""
    with pytest.raises(ValueError, match=r"defense_params.*n >= 4f \+ 3.*n = 10 and f = 2"):
        RunConfig(defense="bulyan", attack="krum_untargeted", n_attackers=2)
    RunConfig(defense="bulyan", attack="krum_untargeted", n_attackers=3, defense_params={"f": 1})
    RunConfig(defense="bulyan", attack="krum_untargeted", n_attackers=1)  # 10 >= 7
    RunConfig(defense="bulyan", n_clients=7)  # no attackers: f = 1
    with pytest.raises(ValueError, match="n = 6 and f = 1"):
        RunConfig(defense="bulyan", n_clients=6)


def test_default_backdoor_is_the_papers_single_target() -> None:
    """The authors' code's mal_obj = single (one class-4 image relabelled 3); the aux class is resolved
    per cell (serversets.resolve_aux_class)."""
    c = RunConfig()
    assert (c.backdoor, c.backdoor_mode, c.aux_class) == ("semantic", "single", None)
    assert RunConfig(aux_class=0).aux_class == 0


def test_model_params_reach_the_network_and_bad_ones_are_named() -> None:
    """model_params: the authors' code's ReLU on CIFAR-10's dense-128 layer (Table 7 shows none)."""
    from torch import nn

    from robustfl.models import build_model

    relu = build_model("cifar10_cnn", 10, 3, **RunConfig(dataset="cifar10", model_params={"dense_relu": True}).model_params)
    plain = build_model("cifar10_cnn", 10, 3)
    assert isinstance(relu.features[-1], nn.ReLU) and isinstance(plain.features[-1], nn.Identity)
    with pytest.raises(ValueError, match="cifar10_cnn.*dense_rel"):
        build_model("cifar10_cnn", 10, 3, dense_rel=True)


#: cell ids (and checkpoint hashes) computed before the engine settings moved into the ``engine`` mapping
#: (commit 4695832, flat fields engine / conv / cuda_graph): run directories of existing results
KNOWN_IDS = [
    ({}, "default", "13bd443f2a25b8e5"),
    ({"dataset": "cifar10"}, "dataset=cifar10", "111bf3b86c3a486b"),
    ({"dataset": "fmnist", "attack": "krum_backdoor", "n_attackers": 1, "defense": "flare", "seed": 2},
     "dataset=fmnist,n_attackers=1,attack=krumbackdoor,defense=flare", "97082cf3951a1bda"),
    ({"dataset": "cifar10", "attack": "median_backdoor", "n_attackers": 2, "defense": "median", "backdoor": "trojan",
      "attack_params": {"variant": "code", "boost": 5.0}},
     "dataset=cifar10,n_attackers=2,attack=medianbackdoor,attack_params=boost5.0-variantcode,defense=median,"
     "backdoor=trojan", "9671313a3401c712"),
    ({"dataset": "kather", "partition": "dirichlet", "partition_params": {"alpha": 0.5}, "defense": "bulyan",
      "defense_params": {"f": 1}, "precision": "bf16"},
     "dataset=kather,defense=bulyan,defense_params=f1,partition=dirichlet,partition_params=alpha0.5,precision=bf16",
     "40b5e261b562aaa2"),
    ({"model_params": {"dense_relu": True}, "dataset": "cifar10", "snapshot_round": None, "eval_every": 2},
     "dataset=cifar10,model_params=dense_reluTrue,snapshot_round=None,eval_every=2", "764a3cce046c7d79"),
    # non-default engine keys: named as the flat fields were, where they were
    ({"dataset": "digits", "rounds": 2, "local_epochs": 1, "batch_size": 32, "device": "cpu",
      "engine": {"kind": "vectorised", "conv": "grouped"}},
     "rounds=2,local_epochs=1,batch_size=32,engine=vectorised,conv=grouped", "7845b3a77d919aff"),
    ({"dataset": "cifar10", "engine": {"conv": "channels_last"}}, "dataset=cifar10,conv=channelslast",
     "3ae8700eaa67484a"),
    ({"dataset": "cifar10", "engine": {"conv": "triton"}, "precision": "tf32"}, "dataset=cifar10,precision=tf32,conv=triton",
     "e07ff9cd1ceaa9c2"),
    ({"engine": {"kind": "sequential"}, "defense": "fltrust", "aux_class": 2},
     "defense=fltrust,aux_class=2,engine=sequential", "c301823b65a436bb"),
    ({"engine": {"kind": "vectorised", "conv": "triton", "cuda_graph": False}, "precision": "bf16", "deterministic": True},
     "engine=vectorised,precision=bf16,conv=triton,cuda_graph=False,deterministic=True", "7480ccf1eb7efd17"),
]


@pytest.mark.parametrize("fields, cid, chash", KNOWN_IDS)
def test_cell_ids_and_checkpoint_hashes_are_unchanged(fields: dict, cid: str, chash: str) -> None:
    """Default engine settings do not enter a cell id; explicit ones enter it as before the engine mapping."""
    from robustfl.fl.experiment import cell_id
    from robustfl.fl.checkpoint import config_hash

    cfg = RunConfig.from_dict(fields)
    assert cell_id(cfg) == cid
    assert config_hash(cfg) == chash


def test_flat_engine_keys_of_earlier_configs_name_the_new_key() -> None:
    with pytest.raises(ValueError, match=r"\['conv', 'cuda_graph'\] moved into the engine mapping: write engine: "
                                         r"\{conv: \"grouped\", cuda_graph: false\}"):
        RunConfig.from_dict({"conv": "grouped", "cuda_graph": False})
    with pytest.raises(ValueError, match=r"'engine': must be a mapping .*engine: \{kind: vectorised\}"):
        RunConfig.from_dict({"engine": "vectorised"})
    with pytest.raises(ValueError, match="'cudnn' is now called 'vmap'"):
        RunConfig.from_dict({"engine": {"conv": "cudnn"}})
