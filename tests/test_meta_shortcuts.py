"""StepMeter's output-only kernels (planner/meta_shortcuts.py) against the
real kernels: every output's shape, strides, dtype and storage size, on
meta and fake tensors, in fp32, bf16 and fp16, contiguous and channels-last,
training and eval; and a whole profiled step with and without them."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves

from neuroflux.planner import step_meter
from neuroflux.planner.meta_shortcuts import SHORTCUTS
from neuroflux.planner.profile import SGDConfig, profile_step
from neuroflux.runtime.heads import build_head

aten = torch.ops.aten
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _meta(out) -> list:
    return [
        (tuple(t.shape), t.stride(), t.dtype, t.untyped_storage().nbytes(), t.storage_offset(), t.device.type)
        if isinstance(t, torch.Tensor)
        else t
        for t in tree_leaves(out)
    ]


def _cases(device: str, dtype: torch.dtype):
    """(op, args) pairs as a training step dispatches them."""
    for channels_last in (False, True):
        x = torch.empty(4, 6, 5, 5, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.empty(6, device=device), torch.empty(6, device=device)
        rm, rv = torch.empty(6, device=device), torch.empty(6, device=device)
        for training in (True, False):
            yield aten.native_batch_norm.default, (x, w, b, rm, rv, training, 0.1, 1e-5)
            yield aten._native_batch_norm_legit.default, (x, w, b, rm, rv, training, 0.1, 1e-5)
        yield aten._native_batch_norm_legit.no_stats, (x, w, b, True, 0.1, 1e-5)
        yield aten._native_batch_norm_legit_no_training.default, (x, None, None, rm, rv, 0.1, 1e-5)
        save = torch.empty(6, device=device, dtype=torch.float32 if dtype != torch.float32 else dtype)
        for mask in ([True, True, True], [True, False, False]):
            yield aten.native_batch_norm_backward.default, (x, x, w, rm, rv, save, save, True, 1e-5, mask)
        yield aten.threshold_backward.default, (x, x, 0)
    x1 = torch.empty(5, 3, device=device, dtype=dtype)
    yield (
        aten.native_batch_norm.default,
        (x1, None, None, torch.empty(3, device=device), torch.empty(3, device=device), True, 0.1, 1e-5),
    )
    logits = torch.empty(8, 10, device=device, dtype=dtype)
    target = torch.empty(8, device=device, dtype=torch.long)
    yield aten._log_softmax.default, (logits, 1, False)
    yield aten._log_softmax_backward_data.default, (logits, logits, 1, dtype)
    for reduction in (1, 2):
        yield aten.nll_loss_forward.default, (logits, target, None, reduction, -100)
        total = torch.empty((), device=device, dtype=dtype)
        yield (
            aten.nll_loss_backward.default,
            (torch.empty((), device=device, dtype=dtype), logits, target, None, reduction, -100, total),
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["meta", "fake"])
def test_every_shortcut_returns_what_the_real_kernel_returns(where: str, dtype: torch.dtype) -> None:
    fake = FakeTensorMode()
    seen = set()
    with fake if where == "fake" else torch.device("meta"):
        for op, args in _cases("cpu" if where == "fake" else "meta", dtype):
            got = SHORTCUTS[op](*args)
            assert got is not None, (op, dtype)  # the common layouts all take the short way
            assert _meta(got) == _meta(op(*args)), (op, dtype, where)
            seen.add(op)
    assert seen == set(SHORTCUTS), "every shortcut is checked"


def test_a_profiled_step_is_the_same_without_the_shortcuts(monkeypatch) -> None:
    fake = FakeTensorMode()
    with fake:
        unit = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True)
        )
        head = build_head("pooled", (8, 12, 12), 8, 10)

    def prof():
        return profile_step(unit, head, (3, 12, 12), 10, fake_mode=fake, sgd=SGDConfig())

    fast = prof()
    monkeypatch.setattr(step_meter, "SHORTCUTS", {})
    assert prof() == fast
