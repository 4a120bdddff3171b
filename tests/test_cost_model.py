"""The cost model's inputs: FLOPs of the ops whose formulas PyTorch gets
wrong, checked against a count by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from neuroflux.planner.step_meter import StepMeter, flop_counter


def _macs(n: int, c_out: int, c_in_per_group: int, k: int, h_out: int, w_out: int) -> int:
    """Multiply-adds of a convolution, by hand: every output element takes one
    kernel window over its group's input channels."""
    return n * c_out * h_out * w_out * c_in_per_group * k * k


@pytest.mark.parametrize("groups", [1, 4, 32], ids=["dense", "grouped", "depthwise"])
def test_conv_step_flops_are_three_forwards_for_any_groups(groups: int) -> None:
    """A convolution's training step costs its forward three times (the
    forward, the input's gradient, the weight's): 2 FLOPs per multiply-add,
    for dense, grouped and depthwise convolutions alike, in the meter and in
    ``flop_counter``. PyTorch's own counter agrees on dense ones and counts
    a depthwise backward about C times too many."""
    n, c, hw = 4, 32, 8
    conv = nn.Conv2d(c, c, 3, padding=1, stride=2, groups=groups, bias=False)
    x = torch.randn(n, c, hw, hw, requires_grad=True)
    forward = 2 * _macs(n, c, c // groups, 3, hw // 2, hw // 2)
    meter = StepMeter()
    with meter:
        conv(x).sum().backward()
    with flop_counter() as ours:
        conv(x).sum().backward()
    with FlopCounterMode(display=False) as torchs:
        conv(x).sum().backward()
    assert meter.flops == ours.get_total_flops() == 3 * forward
    if groups == 1:
        assert torchs.get_total_flops() == 3 * forward
    elif groups == c:
        assert torchs.get_total_flops() > 10 * forward  # the formula this corrects


def test_frozen_weight_backward_counts_the_input_gradient_only() -> None:
    """Only the gradients asked for are counted: a frozen convolution's
    backward computes its input's gradient alone."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False).requires_grad_(False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    meter = StepMeter()
    with meter:
        conv(x).sum().backward()
    assert meter.flops == 2 * 2 * _macs(2, 8, 1, 3, 6, 6)
