"""Unit discovery on the zoo and on models nobody in the project wrote."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from neuroflux.errors import NeuroFluxError
from neuroflux.planner.units import find_units, propagate_shapes
from neuroflux.runtime.graph import TraceFailure, split_units, trace
from neuroflux.runtime.model_file import load_model_file
from neuroflux.runtime.modules import Chain

ZOO_UNITS = {"small_cnn": 4, "vgg11": 8, "vgg16": 13, "resnet18": 9, "resnet34": 17, "mobilenetv2": 19}


def units_of(model: nn.Module, shape):
    gm = trace(model)
    propagate_shapes(gm, shape, FakeTensorMode(allow_non_fake_inputs=True))
    return gm, find_units(gm)


def check_split_equals_model(model: nn.Module, shape, gm, units) -> None:
    """Units composed in order compute exactly what the model computes."""
    model.eval()
    x = torch.randn(3, *shape)
    chain = Chain(split_units(gm, [u.nodes for u in units])).eval()
    torch.testing.assert_close(chain(x), model(x))


@pytest.mark.parametrize("name", sorted(ZOO_UNITS))
def test_zoo_units(name: str) -> None:
    mf = load_model_file(ROOT / "examples" / f"{name}.py")
    torch.manual_seed(0)
    model = mf.build()
    shape = mf.constant("INPUT_SHAPE")
    gm, units = units_of(model, shape)
    assert len(units) == ZOO_UNITS[name]
    assert units[0].input_shape == tuple(shape)
    assert units[-1].output_shape == (10,)
    assert sum(u.params for u in units) == sum(p.numel() for p in model.parameters())
    for u in units:  # a conv is never separated from its norm
        assert not u.nodes[0].startswith(("bn", "relu")), u.nodes
    check_split_equals_model(model, shape, gm, units)


def test_units_share_parameters_with_the_model() -> None:
    model = load_model_file(ROOT / "examples" / "small_cnn.py").build()
    gm, units = units_of(model, (1, 28, 28))
    mods = split_units(gm, [u.nodes for u in units])
    assert mods[0].get_submodule("conv1").weight is model.conv1.weight


class Inception(nn.Module):
    """Parallel branches joined by concat: no cut inside."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(c, 8, 1)
        self.b3 = nn.Sequential(nn.Conv2d(c, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.pool = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.pool(F.max_pool2d(x, 3, 1, 1))], 1)


class BranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.inc1, self.inc2 = Inception(16), Inception(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.inc2(self.inc1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class DenseBlock(nn.Module):
    def __init__(self, c: int, growth: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(), nn.Conv2d(c + i * growth, growth, 3, padding=1))
            for i in range(n)
        )

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class DenseNet(nn.Module):
    """Dense connectivity: every layer sees all earlier ones; cuts only at transitions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block1 = DenseBlock(16, 8, 3)
        self.trans1 = nn.Sequential(nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 20, 1), nn.AvgPool2d(2))
        self.block2 = DenseBlock(20, 8, 3)
        self.head = nn.Linear(44, 7)

    def forward(self, x):
        x = self.block2(self.trans1(self.block1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


class FunctionalNet(nn.Module):
    """Functional ops and parameters used through F.conv2d / F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.w_fc = nn.Parameter(torch.randn(4, 16) * 0.1)

    def forward(self, x):
        x = F.relu(self.bn(F.conv2d(x, self.w1, padding=1)))
        x = F.relu(self.conv2(x)).mean([2, 3])
        return F.linear(x.view(x.shape[0], -1), self.w_fc)


def test_branch_concat_units() -> None:
    model = BranchNet()
    gm, units = units_of(model, (3, 16, 16))
    assert len(units) == 3  # stem, inception 1, inception 2 (+ classifier)
    assert any(n.startswith("cat") for n in units[1].nodes)
    check_split_equals_model(model, (3, 16, 16), gm, units)


def test_dense_units_cut_only_at_transitions() -> None:
    model = DenseNet()
    gm, units = units_of(model, (3, 16, 16))
    # stem | dense block 1 | transition | dense block 2 + head
    assert len(units) == 4
    assert units[1].output_shape == (40, 16, 16) and units[2].output_shape == (20, 8, 8)
    check_split_equals_model(model, (3, 16, 16), gm, units)


def test_functional_ops_units() -> None:
    model = FunctionalNet()
    gm, units = units_of(model, (3, 8, 8))
    assert len(units) == 2
    assert units[0].params == 8 * 27 + 16  # the functional conv and its norm
    check_split_equals_model(model, (3, 8, 8), gm, units)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model_names_the_module() -> None:
    with pytest.raises(TraceFailure, match=r"module 'gate' \(Gate\)"):
        trace(DataDependent())


def test_tied_weights_across_units_are_refused() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean([2, 3]))

    with pytest.raises(NeuroFluxError, match="used by units"):
        units_of(Tied(), (4, 8, 8))
