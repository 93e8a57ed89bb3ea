"""Attack registry: config name -> ``fn(ctx: AttackContext) -> Tensor (n_attackers, d)``.

Adding an attack is one function plus one line::

    @register_attack("my_attack", targeted=False)
    def my_attack(ctx: AttackContext) -> torch.Tensor: ...

``targeted=True`` marks backdoor attacks: the simulator then builds the backdoor set and measures ASR;
``backdoor="trojan"`` marks one that needs the trojan set (the report card and the study check use it).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from robustfl.attacks.base import AttackContext
from robustfl.registry import Registry

AttackFn = Callable[[AttackContext], torch.Tensor]
ATTACKS: Registry[AttackFn] = Registry("attack")


def register_attack(name: str, *, targeted: bool, backdoor: str | None = None) -> Callable[[AttackFn], AttackFn]:
    """``backdoor``: the backdoor set kind (``trojan`` / ``semantic``) a targeted attack works only with."""
    def deco(fn: AttackFn) -> AttackFn:
        fn.targeted = targeted  # type: ignore[attr-defined]
        fn.backdoor = backdoor  # type: ignore[attr-defined]
        return ATTACKS.register(name)(fn)

    return deco


def is_targeted(name: str) -> bool:
    return bool(getattr(ATTACKS.get(name), "targeted", False))


def required_backdoor(name: str) -> str | None:
    """The backdoor set kind attack ``name`` needs (config ``backdoor``), or None where any will do."""
    return getattr(ATTACKS.get(name), "backdoor", None)


# Importing the modules registers their attacks.
from robustfl.attacks import adaptive, backdoor, backdoor_suite, byzantine, minmax, untargeted  # noqa: E402,F401

__all__ = ["ATTACKS", "AttackContext", "register_attack", "is_targeted", "required_backdoor"]
