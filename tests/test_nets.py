"""Model behaviour: every net honours the raw-pixel contract and converts with jit and export."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightcycle.model import nets
from lightcycle.model.datamodule import augment


@pytest.fixture(params=nets.NET_NAMES)
def net(request):
    torch.manual_seed(0)
    return nets.build_net(request.param).eval()


def test_logits_shape_and_dtype(net):
    out = net(nets.example_input(3))
    assert out.shape == (3, 10) and out.dtype == torch.float32


def test_normalization_lives_inside_the_net(net):
    # Raw 0-255 pixels go in; a net that skipped normalization would see 255x larger inputs.
    normalize = next(m for m in net.modules() if isinstance(m, nets.Normalize))
    x = torch.full((1, 1, 28, 28), nets.PIXEL_MEAN)
    assert torch.allclose(normalize(x), torch.zeros_like(x), atol=1e-5)
    # ...and forward runs it, first, on the raw pixels it was given.
    seen = []
    handle = normalize.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        raw = nets.example_input(2)
        net(raw)
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], raw)


def test_torchscript_script_and_trace_match_eager(net):
    x = nets.example_input(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, x)
    torch.testing.assert_close(scripted(x), net(x))
    torch.testing.assert_close(traced(x), net(x))


def test_torch_export_matches_eager(net):
    x = nets.example_input(4)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(program.module()(nets.example_input(7)), net(nets.example_input(7)))


def test_unknown_net_is_refused():
    with pytest.raises(ValueError, match="choose one of cnn, mlp, resnet18"):
        nets.build_net("vgg")


def test_augment_keeps_shape_range_and_moves_pixels():
    torch.manual_seed(0)
    x = nets.example_input(16)
    y = augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 255
    assert not torch.equal(x, y)
