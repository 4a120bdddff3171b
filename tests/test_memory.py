"""Predicted block peaks (composed from unit profiles) against PyTorch's own
accounting (MemTracker) of a real training step of that block on CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, plan_for
from torch.distributed._tools.mem_tracker import MemTracker

from neuroflux.runtime.assemble import assemble
from neuroflux.runtime.model_file import load_model_file
from neuroflux.runtime.precision import Precision
from neuroflux.runtime.train import UnitTrainer, block_step

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow


def measured_block_peak(plan, asm, block) -> int:
    """MemTracker's peak of a real step of ``block``, at the plan's precision,
    on the input the runtime feeds it (the data in fp32; a cache or a
    recomputed prefix at the compute precision)."""
    idx = [u.index for u in plan.units if u.name in block.units]
    precision = Precision.of(plan.recipe, "cpu")
    trainers = [
        UnitTrainer(
            asm.units[i],
            asm.heads[i],
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            total_steps=10,
            schedule="cosine",
            precision=precision,
        )
        for i in idx
    ]
    shape = plan.units[idx[0]].input_shape
    dtype = torch.float32 if idx[0] == 0 else precision.dtype
    b = block.batch_size
    y = torch.randint(0, plan.model.num_classes, (b,))
    # The runner hands a block its batch in the run's memory format.
    block_step(trainers, [precision.randn(b, shape, dtype=dtype)], y)  # creates momentum buffers: steady state
    tracker = MemTracker()
    for t in trainers:
        tracker.track_external(*t.modules(), t.opt)
    with tracker:
        block_step(trainers, [precision.randn(b, shape, dtype=dtype)], y)
    return sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values())


@pytest.mark.parametrize(
    "model,budget,head_kind,precision,memory_format",
    [
        ("small_cnn", 20 * 10**6, "pooled", "fp32", "channels_last"),
        ("small_cnn", 20 * 10**6, "conv", "fp32", "contiguous"),
        ("small_cnn", 20 * 10**6, "dgl", "fp32", "channels_last"),
        ("small_cnn", 20 * 10**6, "stage", "fp32", "contiguous"),
        ("resnet18", 150 * 10**6, "pooled", "fp32", "channels_last"),
        ("mobilenetv2", 120 * 10**6, "pooled", "fp32", "contiguous"),
        ("mobilenetv2", 120 * 10**6, "pooled", "fp32", "channels_last"),
        ("small_cnn", 20 * 10**6, "pooled", "bf16", "channels_last"),
        ("small_cnn", 20 * 10**6, "conv", "fp16", "contiguous"),
        ("tests/residual_model", 3 * 10**6, "pooled", "bf16", "channels_last"),
    ],
)
def test_block_peak_is_never_under_pytorch_accounting(
    tmp_path, model, budget, head_kind, precision, memory_format
) -> None:
    file, _, factory = model.partition(":")
    src = file if "/" in file else f"examples/{file}"
    result, _ = plan_for(
        f"{ROOT / src}.py" + (f":{factory}" if factory else ""),
        tmp_path,
        budget=budget,
        max_batch=64,
        head_kind=head_kind,
        precision=precision,
        memory_format=memory_format,
        # Mixed precision profiles on fake tensors (autocast skips meta ones): two head widths keep it short.
        max_aux_options=4 if precision == "fp32" else 2,
    )
    plan = result.plan
    assert {u.aux.kind for u in plan.units if u.aux is not None} == {head_kind}
    assert plan.recipe.memory_format == memory_format
    assert len(plan.blocks) >= 2, "a budget that splits the model: the blocks' own peaks are checked"
    asm = assemble(plan, load_model_file(ROOT / f"{src}.py", factory=factory))
    for block in plan.blocks:
        assert block.predicted_peak_bytes <= plan.budget_bytes
        real = measured_block_peak(plan, asm, block)
        # Never under (but for whole-byte rounding of the per-sample slope); exact at the ends of the profiled
        # batch range, a little over between them (a chord of a convex peak: ProfilingJobs.batches).
        assert 0.9999 * real <= block.predicted_peak_bytes <= 1.05 * real, (
            block.units,
            block.predicted_peak_bytes,
            real,
        )


def test_weight_heavy_units_are_never_under_predicted_at_large_batches(tmp_path) -> None:
    """ResNet-18's last stage holds more weights than activations: at small
    batches its step peaks in the backward with its parameter gradients, at
    large ones in the activations. A line fitted at batches 8 and 16
    under-predicted it 9% at batch 192 (1.5x for the last unit alone); the
    line through the ends of the batch range is exact there."""
    result, _ = plan_for(
        f"{ROOT / 'examples' / 'resnet18.py'}:model_half",
        tmp_path,
        budget=400 * 10**6,
        min_batch=192,
        max_batch=192,
        max_block_units=3,
        max_aux_options=1,
    )
    plan = result.plan
    asm = assemble(plan, load_model_file(ROOT / "examples" / "resnet18.py", factory="model_half"))
    last = plan.blocks[-1]
    assert last.batch_size == 192 and "u8" in last.units
    real = measured_block_peak(plan, asm, last)
    assert 0.9999 * real <= last.predicted_peak_bytes <= 1.0001 * real, (last.predicted_peak_bytes, real)
