"""The cells ``nf-bench`` runs: a model at a budget with its methods, the prepared presets (``cpu``, ``gpu``,
``smoke``) and the cells one invocation's flags name.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroflux.errors import NeuroFluxError

__all__ = ["ABLATION", "LEVERS", "LEVER_ABLATION", "METHODS", "PRESETS", "ROOT", "Cell", "model_path", "resolve_cells"]

#: The repository: the zoo models are its examples/, and results name paths relative to it.
ROOT = Path(__file__).resolve().parents[1]
METHODS = ("neuroflux", "neuroflux-greedy", "bp", "bp-checkpoint", "bp-checkpoint-all", "bp-compile")


def model_path(name: str) -> str:
    """A zoo name (``resnet18``, ``resnet18:model_half``) as its file in examples/; a model file as given."""
    path, _, factory = name.partition(":")
    if not path.endswith(".py"):
        path = str(ROOT / "examples" / f"{path}.py")
    return f"{path}:{factory}" if factory else path


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One benchmark cell: a model at a budget, every method side by side."""

    name: str
    model: str
    budget: str
    epochs: int
    methods: tuple[str, ...] = METHODS
    limit: str | None = None
    """TRAIN[,VAL]: first samples only."""
    datasets: str = "datasets"
    data: str | None = "fashion_mnist"
    """``fashion_mnist``: the full shared file; None: what the model file loads by default."""
    variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    """Extra NeuroFlux runs (ablation): (label, PlanConfig option overrides)."""
    options: tuple[tuple[str, Any], ...] = ()
    """PlanConfig options of every plan of the cell (a variant's overrides win): its levers, its precision."""


#: The ablation: what the new heads and adaptive depth each buy, on the same cell (each label says what is
#: switched off: conv heads at the old tie tolerance, and training every block for its planned epochs).
ABLATION = (
    (
        "old heads, fixed depth",
        (
            ("head_kind", "conv"),
            ("tie_tolerance", 0.01),
            ("patience", 0),
            ("epoch_patience", 0),
            ("max_block_units", None),
        ),
    ),
    ("new heads, fixed depth", (("patience", 0), ("epoch_patience", 0), ("max_block_units", None))),
)

_GPU_METHODS = ("neuroflux", "bp", "bp-checkpoint")

#: Issue 19's levers: AugLocal-style stage heads (widened within 30% of the least time), the end-to-end polish
#: of the kept exit (half an epoch), and an exit at least 10x smaller than the model.
LEVERS: tuple[tuple[str, Any], ...] = (
    ("head_kind", "stage"),
    ("tie_tolerance", 0.3),
    ("polish_epochs", 0.5),
    ("min_reduction", 10.0),
)

#: Issue 19's ablation, lever by lever, on the CPU ResNet-18 cells (each label says what is switched on; the
#: size limit brings its bank of epochs and its trim of the block that holds the last small exit).
LEVER_ABLATION = (
    ("stage heads", LEVERS[:2]),
    ("stage heads + exit >= 10x smaller", (*LEVERS[:2], LEVERS[3])),
    ("stage heads + polish + exit >= 10x smaller", LEVERS),
    # The batch rule (seventh session): each block the smallest batch within 10% of its least time; no polish.
    ("stage heads + exit >= 10x smaller + batch rule", (*LEVERS[:2], LEVERS[3], ("batch_time_tolerance", 0.1))),
)


def _bf16_cell(
    name: str, model: str, budget: str, *, epochs: int = 3, limit: str = "20000,10000", levers: bool = True
) -> Cell:
    """A CPU cell with every method in bf16 (issue 20) and, with ``levers``, the levers issue 19 chose (no
    polish) as a NeuroFlux variant."""
    return Cell(
        name=name,
        model=model,
        budget=budget,
        epochs=epochs,
        limit=limit,
        methods=("neuroflux", "bp", "bp-checkpoint", "bp-compile"),
        options=(("precision", "bf16"),),
        variants=(LEVER_ABLATION[3],) if levers else (),
    )


PRESETS: dict[str, tuple[Cell, ...]] = {
    # CPU (2 cores): half-width models on the first 20,000 training images.
    "cpu": (
        Cell(
            name="resnet18-half-80MB",
            model="resnet18:model_half",
            budget="80MB",
            epochs=3,
            limit="20000,10000",
            variants=ABLATION + LEVER_ABLATION,
        ),
        Cell(name="vgg11-half-40MB", model="vgg11:model_half", budget="40MB", epochs=3, limit="20000,10000"),
        Cell(
            name="resnet18-half-400MB",
            model="resnet18:model_half",
            budget="400MB",
            epochs=3,
            limit="20000,10000",
            variants=LEVER_ABLATION,
        ),
    ),
    # Issue 20: the CPU cells in bf16 (a CPU with native bf16: avx512_bf16 or amx_bf16), NeuroFlux against BP,
    # budget-optimal checkpointing and bp-compile at the same precision, with the chosen levers as a variant.
    "cpu-bf16": (
        _bf16_cell("vgg11-half-40MB-bf16", "vgg11:model_half", "40MB"),
        _bf16_cell("resnet18-half-80MB-bf16", "resnet18:model_half", "80MB"),
        _bf16_cell("mobilenetv2-100MB-bf16", "mobilenetv2", "100MB", epochs=2, limit="10000,2000", levers=False),
        _bf16_cell("resnet18-half-400MB-bf16", "resnet18:model_half", "400MB"),
    ),
    # GPU: full-width models on all of Fashion-MNIST, stringent (BP fits batch 16 or less) and loose budgets;
    # neuroflux-greedy is left out to keep every cell well under 10 minutes on one H100.
    "gpu": (
        # Issue 19's levers (stage heads, the polish, an exit at least 10x smaller), in fp32 and in bf16 (issue 20:
        # every method at that precision, against the strongest baseline).
        Cell(
            name="resnet18-350MB-levers",
            model="resnet18",
            budget="350MB",
            epochs=3,
            methods=_GPU_METHODS,
            options=LEVERS,
        ),
        Cell(
            name="resnet18-350MB-bf16",
            model="resnet18",
            budget="350MB",
            epochs=3,
            methods=(*_GPU_METHODS, "bp-compile"),
            options=(*LEVERS, ("precision", "bf16")),
            # cuDNN's bf16 convolutions run NHWC natively: whether the layout pays on a GPU too.
            variants=(("channels_last", (("memory_format", "channels_last"),)),),
        ),
        # Issue 19's epochs lever: NeuroFlux alone at twice the epochs per block (it trained 2.7x faster than BP
        # at 3), in fp32, bf16 and without the size limit; its BP is resnet18-350MB-levers' (same data and seed).
        Cell(
            name="resnet18-350MB-levers-e6",
            model="resnet18",
            budget="350MB",
            epochs=6,
            methods=("neuroflux",),
            options=LEVERS,
            variants=(
                ("bf16", (("precision", "bf16"),)),
                ("any exit size", (("min_reduction", 1.0),)),
                ("batch rule", (("batch_time_tolerance", 0.1),)),
            ),
        ),
        Cell(name="resnet18-350MB", model="resnet18", budget="350MB", epochs=3, methods=_GPU_METHODS),
        Cell(name="vgg16-350MB", model="vgg16", budget="350MB", epochs=3, methods=_GPU_METHODS),
        Cell(
            name="resnet34-imagenet-8GB",
            model="resnet34:model_imagenet",
            budget="8GB",
            epochs=1,
            datasets="datasets_imagenet",
            data=None,
            methods=_GPU_METHODS,
        ),
        Cell(name="resnet18-2GB", model="resnet18", budget="2GB", epochs=3, methods=_GPU_METHODS),
        Cell(name="vgg16-2GB", model="vgg16", budget="2GB", epochs=3, methods=_GPU_METHODS),
    ),
    # CI: checks the harness, not speed.
    # (bp-compile left out: its compiles alone take a minute on 2 cores; tests/test_compile_baseline.py runs it.)
    "smoke": (
        Cell(
            name="small_cnn-40MB",
            model="small_cnn",
            budget="40MB",
            epochs=1,
            limit="512,128",
            data=None,
            methods=tuple(m for m in METHODS if m != "bp-compile"),
        ),
    ),
}


def resolve_cells(args: argparse.Namespace) -> list[Cell]:
    """The cells one invocation runs: a preset (optionally some of its cells) or the flags, once per
    ``--seeds`` seed (as CELL-seedN)."""
    cells = _cells(args)
    if not getattr(args, "seeds", None):
        return cells
    return [
        dataclasses.replace(c, name=f"{c.name}-seed{s}", options=(*c.options, ("seed", s)))
        for c in cells
        for s in args.seeds
    ]


def _cells(args: argparse.Namespace) -> list[Cell]:
    if args.preset:
        cells = list(PRESETS[args.preset])
        if args.cell:
            names = {c.name for c in cells}
            unknown = [n for n in args.cell if n not in names]
            if unknown:
                raise NeuroFluxError(
                    f"preset {args.preset} has no cell {', '.join(unknown)}; its cells: {', '.join(sorted(names))}"
                )
            cells = [c for c in cells if c.name in args.cell]
        return cells
    if args.smoke:  # explicit flags still win
        base = PRESETS["smoke"][0]
        return [
            Cell(
                name=f"small_cnn-{b}",
                model="small_cnn",
                budget=b,
                epochs=1,
                limit=args.limit or base.limit,
                data=None,
                methods=base.methods,
                variants=tuple(getattr(args, "variant", None) or ()),
            )
            for b in (args.budgets or [base.budget])
        ]
    return [
        Cell(
            name=f"{Path(m.split(':')[0]).stem}{'-' + m.split(':')[1] if ':' in m else ''}-{b}",
            model=m,
            budget=b,
            epochs=args.epochs,
            methods=tuple(args.methods),
            limit=args.limit,
            datasets=args.datasets,
            data="fashion_mnist" if args.data else None,
            variants=tuple(getattr(args, "variant", None) or ()),
        )
        for m in args.models
        for b in (args.budgets or ["16MB"])
    ]
