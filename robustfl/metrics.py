"""Evaluation metrics of Section 6.2: clean accuracy, attack success rate and target confidence."""
from __future__ import annotations

import torch
from torch import nn

from robustfl.train import prepare_inputs


@torch.no_grad()
def backdoor_metrics(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """ASR = fraction of targeted inputs classified as their target label; confidence = the model's
    mean softmax probability q_t of the target label on them (Section 6.2, Figures 7-9)."""
    if len(target) == 0:
        return float("nan"), float("nan")
    was = model.training
    model.eval()
    logits = model(prepare_inputs(x)).float()
    model.train(was)
    prob = logits.softmax(1)
    asr = (logits.argmax(1) == target).float().mean().item()
    conf = prob.gather(1, target.view(-1, 1)).mean().item()
    return asr, conf


def detected(weights: torch.Tensor) -> torch.Tensor:
    """Section 7.4: a client counts as detected when its aggregation weight is below the mean weight."""
    return weights < weights.mean()
