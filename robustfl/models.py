"""The networks of the paper's Appendix C (Tables 6, 7, 8) and a small one for the offline digits data.

Every model splits into ``features`` (g: input -> penultimate-layer representation, the PLR) and
``head`` (sigma: PLR -> logits), so that ``forward = head o features`` (Figure 3). Inputs are
float NCHW tensors in [0, 1].
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from robustfl.registry import Registry

MODELS: Registry[Callable[..., "PLRModel"]] = Registry("model")


class PLRModel(nn.Module):
    """Base class: ``forward(x) = head(features(x))``; ``features`` gives the PLR r = g(x)."""

    features: nn.Module
    head: nn.Module
    plr_dim: int
    num_classes: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def plr(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def templates(self) -> torch.Tensor:
        """The class templates omega_k (Section 4.2): rows of the last layer's weight, (c, o)."""
        last = [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]
        return last.weight


def _act(on: bool) -> nn.Module:
    return nn.ReLU() if on else nn.Identity()


@MODELS.register("fmnist_cnn")
class FMNISTNet(PLRModel):
    """Table 6: conv5x5(64) - conv5x5(64) - dropout .25 - dense 128 ReLU - dropout .5 - dense 10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: bool = True) -> None:
        super().__init__()
        p1, p2 = (0.25, 0.5) if dropout else (0.0, 0.0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5), nn.ReLU(),
            nn.Conv2d(64, 64, 5), nn.ReLU(),
            nn.Dropout(p1), nn.Flatten(),
            nn.Linear(20 * 20 * 64, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(p2), nn.Linear(128, num_classes))
        self.plr_dim, self.num_classes = 128, num_classes


@MODELS.register("cifar10_cnn")
class CIFARNet(PLRModel):
    """Table 7: three conv3x3(64)+maxpool2 blocks - dense 128 - dense 10.

    Table 7 lists no activation on dense_1; the authors' code has a ReLU there
    (``dense_relu=True``, a named option; see docs/decisions.md).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dense_relu: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * 2 * 64, 128), _act(dense_relu),
        )
        self.head = nn.Sequential(nn.Linear(128, num_classes))
        self.plr_dim, self.num_classes = 128, num_classes


@MODELS.register("kather_cnn")
class KatherNet(PLRModel):
    """Table 8 (VGG-style, 128x128x3 input): five conv3x3 'same' + maxpool2 blocks - dense 128 - dense 8.

    Table 8's conv2d_5 row is inconsistent (input 8x8x128 after a 64-channel block); we read it as
    64 -> 128 channels, which gives the listed 4x4x128 = 2048 flatten size.
    """

    def __init__(self, num_classes: int = 8, in_channels: int = 3, dense_relu: bool = False) -> None:
        super().__init__()
        chans = [in_channels, 64, 64, 64, 64, 128]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 4 * 128, 128), _act(dense_relu))
        self.head = nn.Sequential(nn.Linear(128, num_classes))
        self.plr_dim, self.num_classes = 128, num_classes


@MODELS.register("digits_cnn")
class DigitsNet(PLRModel):
    """Small network for scikit-learn's 8x8 digits (offline default): conv3x3(32)+pool - dense 64 ReLU - dense 10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * 4 * 32, 64), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25 if dropout else 0.0), nn.Linear(64, num_classes))
        self.plr_dim, self.num_classes = 64, num_classes


DEFAULT_MODEL = {"fmnist": "fmnist_cnn", "cifar10": "cifar10_cnn", "kather": "kather_cnn", "digits": "digits_cnn"}


def default_model(dataset: str) -> str:
    """The paper's network for a dataset (Appendix C); other image sets fall back by shape in build_model."""
    return DEFAULT_MODEL.get(dataset, "cifar10_cnn")


def build_model(name: str, num_classes: int, in_channels: int, **kwargs: object) -> PLRModel:
    """Instantiate a registered model by config name; ``kwargs`` are its options (``model_params``), an
    option the network does not take is an error naming it."""
    factory = MODELS.get(name)
    try:
        return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} does not take the option(s) {sorted(kwargs)}: {exc}") from None
