"""Units: spans of the traced graph between cut points.

A *cut point* is a node whose output is the only activation alive at that
point of the graph order: it dominates the output (``networkx.
immediate_dominators`` from the input) and no earlier activation is read
after it. Spans between cut points that hold a compute layer (a layer with
parameters other than a normalisation) start a unit; parameter-free spans and
norms join the unit before them, so a conv keeps its norm, activation and
pool. Everything after the last feature map (flatten, the classifier) belongs
to the last unit, whose exit is the model's own output.

Results go in ``node.meta`` under documented keys (see ``META_*``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.graph import META_ROOT, META_SHAPE, META_UNIT, attr_at
from neuroflux.runtime.precision import FP32, Precision

__all__ = [
    "UnitSpan",
    "unit_signature",
    "find_units",
    "keep_small_blocks_whole",
    "propagate_shapes",
    "activation_graph",
    "META_SHAPE",
    "META_UNIT",
]


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True, kw_only=True)
class UnitSpan:
    index: int
    nodes: tuple[str, ...]
    input_node: str
    output_node: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    input_dtype: torch.dtype = torch.float32
    """Of the unit's input as the runtime feeds it (under mixed precision,
    the previous unit's output dtype under autocast)."""
    output_dtype: torch.dtype = torch.float32


def propagate_shapes(
    gm: fx.GraphModule,
    input_shape: Sequence[int],
    fake_mode: FakeTensorMode,
    *,
    batch: int = 2,
    precision: Precision = FP32,
) -> None:
    """Run ShapeProp on fake tensors (under ``precision``'s autocast) and
    store per-sample shapes (and the dtypes) in meta."""
    with fake_mode:
        x = torch.empty((batch, *input_shape))
    try:
        with precision.autocast():
            ShapeProp(gm, fake_mode=fake_mode).propagate(x)
    except Exception as e:
        raise NeuroFluxError(
            f"running the model on an input of shape {(batch, *input_shape)} failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}; check INPUT_SHAPE in the model file"
        ) from e
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
        node.meta[META_SHAPE] = tuple(shape[1:]) if shape is not None and len(shape) >= 1 else None


def _dtype(node: fx.Node) -> torch.dtype:
    """The dtype ShapeProp saw at ``node`` (float32 where it saw none)."""
    return getattr(node.meta.get("tensor_meta"), "dtype", None) or torch.float32


def activation_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Nodes reachable from the input (activations), with data edges."""
    g = nx.DiGraph()
    (inp,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reach = {inp}
    for node in gm.graph.nodes:  # graph order is topological
        if node in reach:
            g.add_node(node.name)
            for user in node.users:
                reach.add(user)
                g.add_edge(node.name, user.name)
    return g


def _cut_points(gm: fx.GraphModule, g: nx.DiGraph) -> list[fx.Node]:
    nodes = list(gm.graph.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    inp = nodes[0] if nodes[0].op == "placeholder" else next(n for n in nodes if n.op == "placeholder")
    out = next(n for n in nodes if n.op == "output")
    if not isinstance(out.args[0], fx.Node):
        raise NeuroFluxError("the model's forward must return one tensor (the logits), not a tuple or dict")
    idom = nx.immediate_dominators(g, inp.name)
    chain, v = [], out.name
    while v != inp.name:
        v = idom[v]
        chain.append(v)
    candidates = sorted(set(chain) - {out.name}, key=order.__getitem__)
    # Confirm by liveness in graph order: nothing before the candidate is
    # read after it (dead branches and odd orders make dominance alone loose).
    last_use = {n.name: max((order[u.name] for u in n.users), default=order[n.name]) for n in nodes if n.name in g}
    cuts = []
    for name in candidates:
        pos = order[name]
        alive = [m for m in g if order[m] < pos and last_use[m] > pos]
        node = nodes[pos]
        if not alive and node.meta.get(META_SHAPE) is not None:
            cuts.append(node)
    return cuts


def _is_compute(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A layer with parameters that is not a normalisation."""
    if node.op == "call_module":
        mod = gm.get_submodule(cast(str, node.target))  # call_module: a module path
        return not isinstance(mod, _NORMS) and any(True for _ in mod.parameters())
    if node.op in ("call_function", "call_method"):
        return any(isinstance(a, fx.Node) and a.op == "get_attr" and _is_param(gm, a) for a in node.all_input_nodes)
    return False


def _orig(gm: fx.GraphModule, path: str) -> nn.Module:
    """The module at ``path`` in the traced model (GraphModule rebuilds the
    enclosing modules as plain ``nn.Module``; ``trace`` keeps the original)."""
    root = gm.meta.get(META_ROOT, gm)
    return root.get_submodule(path)


def _is_param(gm: fx.GraphModule, node: fx.Node) -> bool:
    try:
        return isinstance(gm.get_parameter(cast(str, node.target)), nn.Parameter)  # get_attr: an attribute path
    except AttributeError:
        return False


def _params_of(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in nodes:
        if node.op == "call_module":
            for pname, p in gm.get_submodule(cast(str, node.target)).named_parameters():
                out[f"{node.target}.{pname}"] = p.numel()
        for a in node.all_input_nodes:
            if a.op == "get_attr" and _is_param(gm, a):
                target = cast(str, a.target)
                out[target] = gm.get_parameter(target).numel()
    return out


#: Policy: should a cut inside this module (at this path) be dropped?
KeepWhole = Callable[[nn.Module, str], bool]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def keep_small_blocks_whole(module: nn.Module, path: str, *, max_compute_layers: int = 4) -> bool:
    """Default policy: a user-defined block (not a plain container, not a
    torch.nn layer) with at most ``max_compute_layers`` conv/linear layers is
    kept in one unit, like an inverted residual without its skip. Larger
    user modules (a whole feature extractor) may still be cut inside."""
    if isinstance(module, _CONTAINERS) or type(module).__module__.startswith("torch.nn"):
        return False
    compute = sum(1 for m in module.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))
    return compute <= max_compute_layers


def _scopes(node: fx.Node) -> list[str]:
    return list((node.meta.get("nn_module_stack") or {}).keys())


def find_units(gm: fx.GraphModule, *, keep_whole: KeepWhole = keep_small_blocks_whole) -> list[UnitSpan]:
    """Units of a shape-propagated GraphModule; writes ``META_UNIT``.

    ``keep_whole`` is the policy for cuts inside modules: a cut between two
    nodes that both run inside a module it accepts is not used. Five passes:
    spans between cut points, spans merged where the policy keeps a module
    whole, spans grouped into units (a unit starts at a compute layer; the
    classifier joins the last), parameters checked to belong to one unit,
    and the unit records."""
    g = activation_graph(gm)
    nodes = list(gm.graph.nodes)
    inp = next(n for n in nodes if n.op == "placeholder")
    spans = _spans_between_cuts(gm, g, nodes, inp)
    groups = _group_into_units(gm, _merge_kept_whole(gm, spans, keep_whole))
    _check_params_owned_once(gm, groups)
    units = []
    prev_node = inp
    for i, grp in enumerate(groups):
        for n in grp:
            n.meta[META_UNIT] = i
        last = grp[-1]
        units.append(
            UnitSpan(
                index=i,
                nodes=tuple(n.name for n in grp),
                input_node=prev_node.name,
                output_node=last.name,
                input_shape=tuple(prev_node.meta[META_SHAPE]),
                output_shape=tuple(last.meta[META_SHAPE]),
                params=sum(_params_of(gm, grp).values()),
                input_dtype=_dtype(prev_node),
                output_dtype=_dtype(last),
            )
        )
        prev_node = last
    return units


def _spans_between_cuts(gm: fx.GraphModule, g, nodes: list[fx.Node], inp: fx.Node) -> list[list[fx.Node]]:
    """Activation nodes between consecutive cut points (the output is always one)."""
    order = {n.name: i for i, n in enumerate(nodes)}
    cuts = _cut_points(gm, g)
    # One tensor by construction: _cut_points rejects any other output.
    final = cast(fx.Node, next(n for n in nodes if n.op == "output").args[0])
    if not cuts or cuts[-1] is not final:
        cuts.append(final)
    spans: list[list[fx.Node]] = []
    prev = order[inp.name]
    for c in cuts:
        span = [n for n in nodes[prev + 1 : order[c.name] + 1] if n.name in g and n.op not in ("output",)]
        if span:
            spans.append(span)
        prev = order[c.name]
    return spans


def _merge_kept_whole(gm: fx.GraphModule, spans: list[list[fx.Node]], keep_whole: KeepWhole) -> list[list[fx.Node]]:
    """Drop cuts that fall inside a module the policy keeps whole."""
    merged: list[list[fx.Node]] = []
    for span in spans:
        if merged:
            shared = [p for p in _scopes(merged[-1][-1]) if p in _scopes(span[0])]
            if any(keep_whole(_orig(gm, p), p) for p in shared):
                merged[-1].extend(span)
                continue
        merged.append(list(span))
    return merged


def _group_into_units(gm: fx.GraphModule, spans: list[list[fx.Node]]) -> list[list[fx.Node]]:
    """A span with a compute layer starts a unit; others join the last. The
    classifier (everything after the last feature map) joins the last unit."""
    groups: list[list[fx.Node]] = []
    for span in spans:
        if any(_is_compute(gm, n) for n in span) or not groups:
            groups.append(list(span))
        else:
            groups[-1].extend(span)
    if len(groups) > 1 and not any(_is_compute(gm, n) for n in groups[0]):
        groups[1] = groups[0] + groups[1]
        groups.pop(0)
    spatial = [
        i
        for i, grp in enumerate(groups)
        if any(_is_compute(gm, n) and len(n.meta.get(META_SHAPE) or ()) >= 2 for n in grp)
    ]
    if spatial and spatial[-1] < len(groups) - 1:
        k = spatial[-1]
        groups[k:] = [[n for grp in groups[k:] for n in grp]]
    return groups


def _check_params_owned_once(gm: fx.GraphModule, groups: list[list[fx.Node]]) -> None:
    """Each parameter in exactly one unit: local learning cannot share weights."""
    owner: dict[str, int] = {}
    for i, grp in enumerate(groups):
        for pname in _params_of(gm, grp):
            if pname in owner and owner[pname] != i:
                raise NeuroFluxError(
                    f"parameter '{pname}' is used by units {owner[pname]} and {i}; local learning needs every "
                    "parameter inside one unit (untie the weights, or fuse those layers into one module)"
                )
            owner[pname] = i


def unit_signature(mod: fx.GraphModule, input_shape: Sequence[int]) -> str:
    """A key equal for two units that run the same computation on the same
    input shape (ResNet-101's 22 identical bottlenecks in one stage): each
    node's op, its target (a submodule by its repr, which holds its shapes
    and settings, never by its name), its arguments as node positions, and
    the shapes of the parameters read directly. Units with equal keys have
    equal profiles, so the planner profiles one of them."""
    index: dict[fx.Node, int] = {}
    parts: list[str] = [repr(tuple(input_shape))]

    def arg(a: fx.node.Argument) -> fx.node.Argument:
        return fx.node.map_arg(a, lambda n: f"%{index[n]}")

    for i, n in enumerate(mod.graph.nodes):
        index[n] = i
        if n.op == "call_module":
            sub = mod.get_submodule(n.target)
            target = f"{type(sub).__qualname__}:{sub!r}:" + ",".join(
                f"{tuple(t.shape)}{t.dtype}{t.requires_grad}" for t in (*sub.parameters(), *sub.buffers())
            )
        elif n.op == "get_attr":
            t = attr_at(mod, str(n.target))
            target = f"attr:{tuple(t.shape)}{t.dtype}" if isinstance(t, torch.Tensor) else f"attr:{type(t).__name__}"
        elif n.op in ("call_function", "call_method"):
            target = getattr(n.target, "__qualname__", None) or str(n.target)
            target = f"{getattr(n.target, '__module__', '')}.{target}" if n.op == "call_function" else target
        else:
            target = n.op
        parts.append(f"{n.op}|{target}|{arg(n.args)!r}|{arg(n.kwargs)!r}")
    return "\n".join(parts)
