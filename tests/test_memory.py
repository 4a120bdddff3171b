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
    precision = Precision(plan.recipe.precision, "cpu")
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
    block_step(trainers, [torch.randn(b, *shape, dtype=dtype)], y)  # creates momentum buffers: steady state
    tracker = MemTracker()
    for t in trainers:
        tracker.track_external(*t.modules(), t.opt)
    with tracker:
        block_step(trainers, [torch.randn(b, *shape, dtype=dtype)], y)
    return sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values())


@pytest.mark.parametrize(
    "model,budget,head_kind,precision",
    [
        ("small_cnn", 20 * 10**6, "pooled", "fp32"),
        ("small_cnn", 20 * 10**6, "conv", "fp32"),
        ("small_cnn", 20 * 10**6, "dgl", "fp32"),
        ("small_cnn", 20 * 10**6, "stage", "fp32"),
        ("resnet18", 150 * 10**6, "pooled", "fp32"),
        ("mobilenetv2", 120 * 10**6, "pooled", "fp32"),
        ("small_cnn", 20 * 10**6, "pooled", "bf16"),
        ("small_cnn", 20 * 10**6, "conv", "fp16"),
        ("tests/residual_model", 3 * 10**6, "pooled", "bf16"),
    ],
)
def test_block_peak_within_2_percent_of_pytorch_accounting(tmp_path, model, budget, head_kind, precision) -> None:
    file, _, factory = model.partition(":")
    src = file if "/" in file else f"examples/{file}"
    result, _ = plan_for(
        f"{ROOT / src}.py" + (f":{factory}" if factory else ""),
        tmp_path,
        budget=budget,
        max_batch=64,
        head_kind=head_kind,
        precision=precision,
        # Mixed precision profiles on fake tensors (autocast skips meta ones): two head widths keep it short.
        max_aux_options=4 if precision == "fp32" else 2,
    )
    plan = result.plan
    assert {u.aux.kind for u in plan.units if u.aux is not None} == {head_kind}
    assert len(plan.blocks) >= 2, "a budget that splits the model: the blocks' own peaks are checked"
    asm = assemble(plan, load_model_file(ROOT / f"{src}.py", factory=factory))
    for block in plan.blocks:
        assert block.predicted_peak_bytes <= plan.budget_bytes
        real = measured_block_peak(plan, asm, block)
        assert abs(block.predicted_peak_bytes - real) <= 0.02 * real, (block.units, block.predicted_peak_bytes, real)
