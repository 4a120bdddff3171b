"""Graph capture beyond symbolic tracing: a forward with shape arithmetic
plans, trains through the runtime, exports and shows the same units; only
control flow on tensor values is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ROOT, plan_for

from neuroflux.runtime.graph import TraceFailure, trace

SHAPE_MODEL = """
import torch
import torch.nn.functional as F
from torch import nn
from neuroflux.runtime.datasets import synthetic

INPUT_SHAPE = (1, 12, 12)


class Split(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ratio = 0.5
        self.conv = nn.Conv2d(c - int(c * 0.5), c - int(c * 0.5), 3, padding=1)

    def forward(self, x):
        keep = int(x.size(1) * self.ratio)          # int() of a size: symbolic tracing refuses it
        a, b = x[:, :keep], x[:, keep:]
        out = torch.cat([a, F.relu(self.conv(b))], 1)
        n, c, h, w = out.size()
        out = out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        if out.shape[-1] > 8:                       # a branch on a shape, not on values
            out = F.max_pool2d(out, 2)
        return out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = Split(8)
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))


def model():
    return Net()


def datasets():
    return synthetic((1, 12, 12), num_classes=4, train_size=96, val_size=32)
"""


def _model_file(tmp_path: Path, src: str = SHAPE_MODEL) -> Path:
    p = tmp_path / "shapey.py"
    p.write_text(src)
    return p


def test_shape_arithmetic_falls_back_and_keeps_module_names(tmp_path: Path) -> None:
    from neuroflux.runtime.model_file import load_model_file

    model = load_model_file(str(_model_file(tmp_path))).build()
    with pytest.raises(TraceFailure):
        trace(model)  # symbolic tracing alone refuses it
    gm = trace(model, (1, 12, 12))
    assert gm.meta["neuroflux_capture"] == "shape-specialized"
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"stem.0", "block1.conv", "block2.0", "fc"} <= targets
    for batch in (1, 5):  # the batch stays free; the result is the model's
        x = torch.randn(batch, 1, 12, 12)
        model.eval(), gm.eval()
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.slow
def test_shape_model_plans_trains_and_exports(tmp_path: Path) -> None:
    from neuroflux.runtime.runner import RunConfig, run_plan
    from neuroflux.tools.graph_cli import main as nf_graph

    result, path = plan_for(
        _model_file(tmp_path), tmp_path, budget=64 * 2**20, strategy="greedy", epochs=1, min_batch=8, max_batch=32
    )
    plan = result.plan
    assert plan.model.capture == "shape-specialized"
    assert any("block1" in n for u in plan.units for n in u.nodes)
    summary = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", throughput_batch=4))
    assert summary["status"] == "ok" and (tmp_path / "run" / "final_model.onnx").is_file()
    assert nf_graph([str(path), "-o", str(tmp_path / "plan.json.graphml")]) == 0
    graphml = (tmp_path / "plan.json.graphml").read_text()
    assert all(u.name in graphml for u in plan.units)


def test_control_flow_on_values_is_still_refused(tmp_path: Path) -> None:
    src = SHAPE_MODEL.replace("if out.shape[-1] > 8:", "if out.sum() > 0:")
    from neuroflux.runtime.model_file import load_model_file

    model = load_model_file(str(_model_file(tmp_path, src))).build()
    with pytest.raises(TraceFailure, match=r"module 'block1' \(Split\) even with the input shape known"):
        trace(model, (1, 12, 12))


def test_a_batch_fixed_into_the_graph_is_refused(tmp_path: Path) -> None:
    src = SHAPE_MODEL.replace(".view(x.size(0), -1)", ".reshape(2, -1)")
    from neuroflux.runtime.model_file import load_model_file

    model = load_model_file(str(_model_file(tmp_path, src))).build()
    with pytest.raises(TraceFailure, match="fixed the batch size"):
        trace(model, (1, 12, 12))


@pytest.mark.slow
def test_zoo_shufflenet_plans(tmp_path: Path) -> None:
    result, _ = plan_for(
        ROOT / "examples" / "shufflenetv2.py", tmp_path, budget=200 * 2**20, train_size=512, val_size=128
    )
    assert result.plan.model.capture == "shape-specialized" and len(result.plan.units) >= 10
