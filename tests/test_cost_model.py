"""The cost model's inputs: FLOPs of the ops whose formulas PyTorch gets
wrong, checked against a count by hand; the two speeds fitted to reference
training steps, and the profile cache that keeps them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from neuroflux.planner import device_profile
from neuroflux.planner.device_profile import DeviceProfile, load_profile, save_profile
from neuroflux.planner.step_costs import (
    StepSample,
    fit_step_costs,
    measure_step_costs,
    reference_units,
    relative_errors,
)
from neuroflux.planner.step_meter import StepMeter, flop_counter
from neuroflux.runtime.host_memory import host_memory_setting, keep_freed_host_memory

_OLD = DeviceProfile(
    name="cpu", kind="cpu", flops_per_s=1.3e11, op_overhead_s=8e-6, source="measured", date="2026-12-01", torch="2"
)


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


def _sample(ops: int, flops: float, seconds: float, traffic: float = 0.0) -> StepSample:
    return StepSample("s", 1, ops, flops, traffic, seconds)


def test_fit_recovers_the_speeds_that_made_the_times() -> None:
    """Times made by the model itself give back its three speeds; without
    traffic in the times, the fit needs no bandwidth."""
    overhead, flops_per_s, bandwidth = 40e-6, 5e10, 8e9
    cases = ((100, 1e8, 1e6), (300, 4e9, 4e8), (150, 2e10, 1e8), (60, 0, 5e7), (80, 1e9, 9e8))
    samples = [_sample(o, f, o * overhead + f / flops_per_s + b / bandwidth, b) for o, f, b in cases]
    got = fit_step_costs(samples)
    assert got == pytest.approx((overhead, flops_per_s, bandwidth), rel=1e-6)
    no_traffic = [_sample(o, f, o * overhead + f / flops_per_s, b) for o, f, b in cases]
    got = fit_step_costs(no_traffic)
    assert got[:2] == pytest.approx((overhead, flops_per_s), rel=1e-6) and got[2] is None


def test_fit_keeps_every_speed_non_negative_and_refuses_an_undetermined_throughput() -> None:
    # Times proportional to FLOPs with the small steps a little faster: the unconstrained fit's overhead is < 0.
    samples = [_sample(100, 1e9, 0.009), _sample(100, 1e10, 0.1), _sample(400, 4e10, 0.4)]
    overhead, flops_per_s, bandwidth = fit_step_costs(samples)
    assert overhead == 0 and 0.9e11 < flops_per_s < 1.1e11 and bandwidth is None
    with pytest.raises(ValueError, match="throughput"):
        fit_step_costs([_sample(100, 0, 0.01), _sample(200, 0, 0.02)])


def test_a_cached_profile_measured_the_old_way_is_measured_again(tmp_path, monkeypatch) -> None:
    """Profiles cached before the step fit (op overhead from one tiny op's
    dispatch) priced a CPU step at a fifth of its time: they are replaced,
    once; a step-fit profile is read back as it is."""
    monkeypatch.setenv("NEUROFLUX_CACHE", str(tmp_path))
    keep_freed_host_memory()
    now = host_memory_setting()
    fresh = dataclasses.replace(_OLD, flops_per_s=5e10, op_overhead_s=4e-5, speed_method="step-fit")
    fresh = dataclasses.replace(fresh, host_memory=now, memory_format="channels_last")
    calls = []
    monkeypatch.setattr(device_profile, "measure_profile", lambda *a, **k: calls.append(1) or fresh)
    path = device_profile.cached_profile("cpu")[1]
    save_profile(_OLD, path)
    assert device_profile.cached_profile("cpu")[0] == fresh
    assert load_profile(path) == fresh and len(calls) == 2
    assert device_profile.cached_profile("cpu")[0] == fresh and len(calls) == 2
    # Measured under the other host-memory setting (runtime.host_memory): its speeds are not this process's.
    save_profile(dataclasses.replace(fresh, host_memory="default" if now == "kept" else "kept"), path)
    assert device_profile.cached_profile("cpu")[0] == fresh and len(calls) == 3
    # Timed in the other layout (a CPU plan runs channels_last by default): measured again, and each
    # layout has its own file.
    save_profile(dataclasses.replace(fresh, memory_format="contiguous"), path)
    assert device_profile.cached_profile("cpu")[0] == fresh and len(calls) == 4
    assert device_profile.cached_profile("cpu", memory_format="contiguous")[1] != path


def test_the_reference_suite_is_timed_and_fitted_on_this_cpu() -> None:
    """The suite runs on the CPU: every step counted (ops, FLOPs and traffic
    from the planner's StepMeter, depthwise steps included) and timed, and
    the fit gives positive speeds that explain the suite's own times to
    within a factor of 3 each."""
    overhead, flops_per_s, bandwidth, samples = measure_step_costs("cpu", reps=2)
    assert len(samples) == 2 * len(reference_units())
    assert all(s.ops > 20 and s.flops > 0 and s.traffic > 0 and s.seconds > 0 for s in samples)
    assert overhead > 0 and flops_per_s > 0 and (bandwidth is None or bandwidth > 0)
    errors = relative_errors(samples, overhead, flops_per_s, bandwidth)
    assert all(1 / 3 < e < 3 for e in errors), errors
