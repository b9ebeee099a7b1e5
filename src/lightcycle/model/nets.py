"""Plain `nn.Module` networks: what gets scripted, exported, logged and served.

Contract for every net: input is raw pixels, float32 in [0, 255], shape (N, 1, 28, 28);
normalization happens inside `forward`; output is logits (N, 10). A logged net is therefore
self-contained: no client ever needs the training mean and std.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10
# FashionMNIST train-set pixel statistics on the 0-255 scale.
PIXEL_MEAN = 72.94
PIXEL_STD = 90.02

NET_NAMES = ("cnn", "mlp", "resnet18")


class Normalize(nn.Module):
    def __init__(self, mean: float = PIXEL_MEAN, std: float = PIXEL_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CNN(nn.Module):
    """One conv at 28x28, two at 14x14 (28->14->7), then a 3x3 pooled head; `width` scales the
    channels (width/2 at 28x28, 2*width at 14x14).

    A single, half-width conv at full resolution: two `width`-channel convs there cost 40% of
    the multiply-adds and bought no accuracy (bench/training/net_choice.py, 40 epochs, 3 seeds:
    0.817 against 0.819 test accuracy on the sample) for 1.8x the training time and 1.7x the
    deployable's latency. Pooling to 3x3 rather than 1x1 keeps where features are (collar,
    sleeves, sole), which global pooling throws away: +3-5 points on the 720-image sample.
    """

    def __init__(self, width: int = 32, dropout: float = 0.25) -> None:
        super().__init__()
        stem = max(1, width // 2)
        self.normalize = Normalize()
        self.features = nn.Sequential(
            _conv_block(1, stem),
            nn.MaxPool2d(2),
            _conv_block(stem, 2 * width),
            _conv_block(2 * width, 2 * width),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(3),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 9, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


class MLP(nn.Module):
    def __init__(self, width: int = 256, depth: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.normalize = Normalize()
        layers: list[nn.Module] = [nn.Flatten()]
        n_in = 28 * 28
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            n_in = width
        layers.append(nn.Linear(n_in, NUM_CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalize(x))


class ResNet18(nn.Module):
    """torchvision's resnet18 with a 1-channel 3x3 stem and no max-pool (28x28 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.normalize = Normalize()
        backbone = resnet18(weights=None, num_classes=NUM_CLASSES)
        backbone.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def build_net(name: str, width: int | None = None, depth: int | None = None) -> nn.Module:
    """The net called `name`; `width`/`depth` override the defaults where the net has them."""
    if name == "cnn":
        return CNN(**({"width": width} if width else {}))
    if name == "mlp":
        kwargs = {}
        if width:
            kwargs["width"] = width
        if depth:
            kwargs["depth"] = depth
        return MLP(**kwargs)
    if name == "resnet18":
        return ResNet18()
    raise ValueError(f"Unknown model {name!r}: choose one of {', '.join(NET_NAMES)}.")


def example_input(batch: int = 2) -> torch.Tensor:
    """A raw-pixel batch in the nets' input contract (float32, 0-255, (N, 1, 28, 28))."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 1, 28, 28), generator=generator).float()


def spec_of(net: nn.Module) -> dict[str, object]:
    """What `from_spec` needs to rebuild `net`'s architecture: a name and its sizes, read from
    the layers themselves. Saved beside the weights, so loading a logged net runs no pickle and
    does not depend on the module path its class had."""
    if isinstance(net, CNN):
        return {"name": "cnn", "width": net.head[-1].in_features // 18, "dropout": net.head[2].p}
    if isinstance(net, MLP):
        linears = [m for m in net.layers if isinstance(m, nn.Linear)]
        dropouts = [m.p for m in net.layers if isinstance(m, nn.Dropout)]
        return {"name": "mlp", "width": linears[0].out_features if len(linears) > 1 else 256,
                "depth": len(linears) - 1, "dropout": dropouts[0] if dropouts else 0.2}
    if isinstance(net, ResNet18):
        return {"name": "resnet18"}
    raise TypeError(f"{type(net).__name__} is not one of lightcycle's nets ({', '.join(NET_NAMES)}).")


def from_spec(spec: dict[str, object]) -> nn.Module:
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    classes = {"cnn": CNN, "mlp": MLP, "resnet18": ResNet18}
    if spec.get("name") not in classes:
        raise ValueError(f"Unknown net {spec.get('name')!r}: choose one of {', '.join(NET_NAMES)}.")
    return classes[str(spec["name"])](**kwargs)
