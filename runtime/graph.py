"""torch.fx capture shared by the planner and the runtime.

``trace`` produces the GraphModule whose node names the plan refers to;
``split_units`` cuts it into one GraphModule per unit, sharing parameters
with the original model (no copies).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx
from torch import nn

from neuroflux.errors import NeuroFluxError

__all__ = ["TraceFailure", "trace", "split_units", "UnitModule"]


class TraceFailure(NeuroFluxError):
    """torch.fx could not trace the model; says which module and why."""


class _PathTracer(fx.Tracer):
    """A Tracer that remembers which module it is inside, for error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None
        """Innermost module whose forward raised (recorded on the way out)."""

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; a failure names the innermost module."""
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = tracer.failed_in or "(top-level forward)"
        mod = model.get_submodule(tracer.failed_in) if tracer.failed_in else model
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceFailure(
            f"torch.fx cannot trace module '{where}' ({type(mod).__name__}): {reason}. "
            "NeuroFlux needs a traceable forward: replace data-dependent Python control flow "
            "(if/for on tensor values) with tensor ops, or wrap the module with "
            "torch.fx.wrap / make it a leaf module"
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    # GraphModule keeps only the modules the graph calls; the planner's
    # policies look at the enclosing blocks, so keep the original at hand.
    gm.meta["neuroflux_root"] = model
    return gm


class UnitModule(fx.GraphModule):
    """One unit: a GraphModule taking the previous cut point's tensor."""


def split_units(gm: fx.GraphModule, spans: Sequence[Sequence[str]]) -> list[fx.GraphModule]:
    """One GraphModule per span of fx node names, in order.

    Every span's input is the single tensor alive at the cut point before it
    (the model input for the first span), its output the value of its last
    node. Constant subgraphs (``get_attr`` and ops on them) are copied into
    every span that uses them. Parameters and buffers are shared with ``gm``.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [n for span in spans for n in span if n not in by_name]
    if missing:
        raise NeuroFluxError(
            f"the traced model has no nodes {missing[:5]}: the model's structure differs from the one "
            "that was planned; re-plan with nf-plan"
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NeuroFluxError(f"the model's forward takes {len(placeholders)} inputs; NeuroFlux needs exactly one")
    owner = {name: i for i, span in enumerate(spans) for name in span}
    modules: list[fx.GraphModule] = []
    prev_out: fx.Node = placeholders[0]
    for i, span in enumerate(spans):
        graph = fx.Graph()
        x = graph.placeholder("x")
        env: dict[fx.Node, fx.Node] = {prev_out: x}

        def materialize(n: fx.Node, *, graph: fx.Graph = graph, env: dict = env, i: int = i) -> fx.Node:
            if n not in env:
                # Only constants (get_attr and ops on them) may come from
                # outside the span: that is what makes the span a unit.
                assert n.op != "placeholder" and n.name not in owner, f"unit {i} reads {n.name} from another unit"
                env[n] = graph.node_copy(n, materialize)
            return env[n]

        for name in span:
            node = by_name[name]
            env[node] = graph.node_copy(node, materialize)
        last = by_name[span[-1]]
        graph.output(env[last])
        graph.lint()
        modules.append(UnitModule(gm, graph, f"unit{i}"))
        prev_out = last
    return modules
