"""torch.fx capture shared by the planner and the runtime.

``trace`` produces the GraphModule whose node names the plan refers to;
``split_units`` cuts it into one GraphModule per unit, sharing parameters
with the original model (no copies).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from neuroflux.errors import NeuroFluxError

__all__ = [
    "TraceFailure",
    "trace",
    "split_units",
    "UnitModule",
    "attr_at",
    "META_ROOT",
    "META_CAPTURE",
    "META_SHAPE",
    "META_UNIT",
]

# Metadata keys NeuroFlux writes on traced graphs, in one place.
#: ``gm.meta[META_ROOT]``: the original model (the graph keeps only the modules it calls).
META_ROOT = "neuroflux_root"
#: ``gm.meta[META_CAPTURE]``: ``"symbolic"`` or ``"shape-specialized"``.
META_CAPTURE = "neuroflux_capture"
#: ``node.meta[META_SHAPE]``: per-sample output shape (tuple of ints) or None.
META_SHAPE = "neuroflux_shape"
#: ``node.meta[META_UNIT]``: index of the unit that executes the node.
META_UNIT = "neuroflux_unit"


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


def attr_at(root: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` node's dotted ``target`` names under ``root``."""
    v: Any = root
    for part in target.split("."):
        v = getattr(v, part)
    return v


class _ShapeProxy(fx.Proxy):
    """A proxy that knows its value's shape: every dimension but the batch
    is a plain int, so shape arithmetic (``int(x.size(1) * r)``, ``if
    x.shape[-1] > 8``) runs in Python; the batch stays symbolic, so the graph
    works at any batch size."""

    value: Any = None

    def size(self, dim: int | None = None) -> Any:
        v = self.value
        if not isinstance(v, torch.Tensor):
            return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})
        if dim is None:
            batch = self.tracer.create_proxy("call_method", "size", (self, 0), {})
            return (batch, *(int(d) for d in v.shape[1:]))
        if dim % v.dim() == 0:
            return self.tracer.create_proxy("call_method", "size", (self, dim), {})
        return int(v.shape[dim])

    @property
    def shape(self) -> Any:
        return self.size()

    def dim(self) -> Any:
        if isinstance(self.value, torch.Tensor):
            return self.value.dim()
        return self.tracer.create_proxy("call_method", "dim", (self,), {})

    @property
    def ndim(self) -> Any:
        return self.dim()


class _ShapeTracer(_PathTracer):
    """Symbolic tracing that also runs every op on fake tensors of the
    model's static input shape, so that shape arithmetic sees numbers.
    Module calls, and so the user's module names, stay as symbolic tracing
    records them; only control flow on tensor values is still refused."""

    def __init__(self, example: torch.Tensor, fake_mode: Any) -> None:
        super().__init__()
        self.example = example
        self.fake_mode = fake_mode
        self._forwards: list[Any] = []
        self._raw_getattr = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._raw_getattr:  # computing a value: the module's own tensors, not proxies
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self._forwards.append(forward)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._forwards.pop()

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        rv = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if not isinstance(rv, _ShapeProxy):
            return rv
        if kind == "placeholder":
            rv.value = self.example
            return rv
        unwrap = lambda a: a.value if isinstance(a, _ShapeProxy) else a  # noqa: E731
        vargs = fx.node.map_aggregate(args, unwrap)
        vkwargs = fx.node.map_aggregate(kwargs, unwrap)
        self._raw_getattr += 1
        try:
            with self.fake_mode:
                if kind == "call_function":
                    rv.value = target(*vargs, **vkwargs)
                elif kind == "call_method":
                    rv.value = getattr(vargs[0], target)(*vargs[1:], **vkwargs)
                elif kind == "call_module":
                    rv.value = self._forwards[-1](*vargs, **vkwargs)
                elif kind == "get_attr":
                    rv.value = attr_at(self.root, str(target))
        finally:
            self._raw_getattr -= 1
        return rv


def trace(model: nn.Module, input_shape: Sequence[int] | None = None) -> fx.GraphModule:
    """Symbolically trace ``model``; a failure names the innermost module.

    When symbolic tracing fails and ``input_shape`` (one sample's shape) is
    given, the model is traced again with that shape known, which captures
    shape arithmetic in ``forward``; ``gm.meta[META_CAPTURE]`` says
    which capture was used ("symbolic" or "shape-specialized")."""
    tracer = _PathTracer()
    try:
        graph, capture = tracer.trace(model), "symbolic"
    except Exception as first:
        if input_shape is None:
            raise _failure(model, tracer, first) from first
        graph, capture = _trace_with_shape(model, tuple(input_shape), first), "shape-specialized"
    gm = fx.GraphModule(model, graph, type(model).__name__)
    # GraphModule keeps only the modules the graph calls; the planner's
    # policies look at the enclosing blocks, so keep the original at hand.
    gm.meta[META_ROOT] = model
    gm.meta[META_CAPTURE] = capture
    return gm


def _trace_with_shape(model: nn.Module, shape: tuple[int, ...], first: Exception) -> fx.Graph:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        example = torch.empty(2, *shape)
    tracer = _ShapeTracer(example, fake)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise _failure(model, tracer, e, shape_known=True) from e
    # The batch must have stayed symbolic: the graph at another batch size
    # gives that batch size back.
    check = fx.GraphModule(model, graph, type(model).__name__)
    try:
        with fake:
            out = check(torch.empty(3, *shape))
        ok = isinstance(out, torch.Tensor) and out.shape[0] == 3
    except Exception:
        ok = False
    if not ok:
        raise TraceFailure(
            f"torch.fx could not trace {type(model).__name__} symbolically ({_reason(first)}), and tracing it with "
            f"its input shape {shape} fixed the batch size into the graph; compute sizes from x.size(0) or use -1 "
            "in view/reshape for the batch dimension"
        )
    return graph


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _failure(model: nn.Module, tracer: _PathTracer, e: Exception, *, shape_known: bool = False) -> TraceFailure:
    where = tracer.failed_in or "(top-level forward)"
    mod = model.get_submodule(tracer.failed_in) if tracer.failed_in else model
    known = " even with the input shape known (so it branches on tensor values, not shapes)" if shape_known else ""
    return TraceFailure(
        f"torch.fx cannot trace module '{where}' ({type(mod).__name__}){known}: {_reason(e)}. "
        "NeuroFlux needs a traceable forward: replace data-dependent Python control flow "
        "(if/for on tensor values) with tensor ops, or wrap the module with "
        "torch.fx.wrap / make it a leaf module"
    )


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
