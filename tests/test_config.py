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
    assert c.engine == "auto" and RunConfig.from_dict(c.to_dict()) == c


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
