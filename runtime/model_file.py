"""Where a model comes from: a model file (``model.py`` or
``model.py:factory``), an installed module's factory (``mypkg.models:net``),
or a model object in Python (``ModelObject``).

The model-file contract (README, "Model files"): ``model() -> nn.Module``
(required), ``datasets() -> (train, val)`` (required to run), optional
``INPUT_SHAPE`` (C, H, W), ``NUM_CLASSES`` and ``augment(x) -> x``. An
installed module follows the same contract. All three give the planner and
the runtime the same interface (``build``, ``build_fake``, ``datasets``,
``input_shape``, ``num_classes``, ``augment``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

from neuroflux.errors import NeuroFluxError

__all__ = ["ModelFile", "ModelObject", "load_model_file", "sha256_of", "split_spec", "fingerprint", "IMPORT_SPEC"]

#: ``package.module:factory``: a factory in an installed (importable) module.
IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_spec(spec: str) -> tuple[Path, str | None]:
    """``path.py:factory`` -> (path, factory); the factory part is optional."""
    path, sep, name = spec.rpartition(":")
    if sep and path.endswith(".py") and name.isidentifier():
        return Path(path), name
    return Path(spec), None


def fingerprint(model: nn.Module) -> str:
    """A model's structure: its class, and every parameter's and buffer's
    name, shape and dtype (not their values). Two models with the same
    fingerprint split into the same units with the same shapes."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            h.update(f"{kind} {name} {tuple(t.shape)} {t.dtype};".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelFile:
    path: Path
    sha256: str
    module: ModuleType
    factory_name: str
    datasets_name: str
    import_name: str | None = None
    """The module's import name when it was loaded as ``package.module:factory``."""

    @property
    def source(self) -> Literal["file", "import"]:
        return "file" if self.import_name is None else "import"

    @property
    def label(self) -> str:
        """How messages and plans name it: the file, or ``package.module:factory``."""
        return str(self.path) if self.import_name is None else f"{self.import_name}:{self.factory_name}"

    def build_fake(self, fake_mode) -> nn.Module:
        """The model with its parameters in ``fake_mode`` (no memory)."""
        with fake_mode:
            return self.build()

    def build(self) -> nn.Module:
        """Call the factory; any exception becomes a NeuroFluxError with its reason."""
        fn = self._get(self.factory_name, what="model factory")
        try:
            model = fn()
        except (
            SystemExit
        ) as e:  # a plan must never be skipped with exit 0 (nf-plan ... && nf-run would run a stale one)
            raise NeuroFluxError(
                f"{self.path}: {self.factory_name}() called sys.exit({e.code}); a factory must return the model"
            ) from None
        except Exception as e:
            raise NeuroFluxError(
                f"{self.path}: {self.factory_name}() raised {type(e).__name__}: {e}\n{_user_frames(e, self.path)}"
            ) from e
        if not isinstance(model, nn.Module):
            raise NeuroFluxError(
                f"{self.path}: {self.factory_name}() returned {type(model).__name__}, expected a torch.nn.Module"
            )
        if not any(True for _ in model.parameters()):
            raise NeuroFluxError(
                f"{self.path}: {self.factory_name}() returned a model without parameters; there is nothing to train"
            )
        return model

    def datasets(self) -> tuple[Any, Any]:
        fn = self._get(self.datasets_name, what="datasets function")
        try:
            out = fn()
        except Exception as e:
            raise NeuroFluxError(
                f"{self.path}: {self.datasets_name}() raised {type(e).__name__}: {e}\n{_user_frames(e, self.path)}"
            ) from e
        if not (isinstance(out, tuple) and len(out) == 2):
            raise NeuroFluxError(f"{self.path}: {self.datasets_name}() must return (train, val) datasets")
        for part, ds in zip(("train", "val"), out):
            if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")) or len(ds) == 0:
                raise NeuroFluxError(
                    f"{self.path}: {self.datasets_name}() {part} set must be a non-empty map-style dataset"
                )
        return out

    def has_datasets(self) -> bool:
        return callable(getattr(self.module, self.datasets_name, None))

    def constant(self, name: str) -> Any:
        return getattr(self.module, name, None)

    def input_shape(self) -> tuple[int, ...] | None:
        """Declared shape of one sample for this factory/datasets pair, or
        None (then it is read from a training sample).

        The factory's own ``INPUT_SHAPE`` attribute wins
        (``model_imagenet.INPUT_SHAPE = (3, 224, 224)``); the file's
        ``INPUT_SHAPE`` describes the default datasets function and applies
        only when that one is used."""
        own = getattr(self._get(self.factory_name, what="model factory"), "INPUT_SHAPE", None)
        if own is not None:
            return _shape(own, f"{self.factory_name}.INPUT_SHAPE", self.path)
        if self.datasets_name == "datasets" and self.constant("INPUT_SHAPE") is not None:
            return _shape(self.constant("INPUT_SHAPE"), "INPUT_SHAPE", self.path)
        return None

    def num_classes(self) -> int | None:
        """Declared classes: the factory's ``NUM_CLASSES`` attribute, else the
        file's ``NUM_CLASSES`` for the default factory ``model``, else None
        (then read from the model's output)."""
        own = getattr(self._get(self.factory_name, what="model factory"), "NUM_CLASSES", None)
        if own is not None:
            return _classes(own, f"{self.factory_name}.NUM_CLASSES", self.path)
        if self.factory_name == "model" and self.constant("NUM_CLASSES") is not None:
            return _classes(self.constant("NUM_CLASSES"), "NUM_CLASSES", self.path)
        return None

    def augment(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        fn = getattr(self.module, "augment", None)
        return fn if callable(fn) else None

    def _get(self, name: str, *, what: str) -> Callable[..., Any]:
        fn = getattr(self.module, name, None)
        if not callable(fn):
            found = sorted(k for k, v in vars(self.module).items() if callable(v) and not k.startswith("_"))
            raise NeuroFluxError(
                f"{self.path} has no {what} '{name}()'; define it, or name another with "
                f"'{self.path}:NAME' (callables in the file: {', '.join(found) or 'none'})"
            )
        return fn


def load_model_file(spec: str | Path, *, factory: str | None = None, datasets: str = "datasets") -> ModelFile:
    """Import a model file by path (``spec`` may be ``path.py:factory``), or
    an installed module's factory (``package.module:factory``)."""
    if not Path(str(spec)).exists() and IMPORT_SPEC.match(str(spec)) and ".py:" not in str(spec):
        return _load_import(str(spec), factory=factory, datasets=datasets)
    path, spec_factory = split_spec(str(spec))
    factory = factory or spec_factory or "model"
    if not path.is_file():
        hint = " (did you mean a .py file?)" if path.suffix != ".py" else ""
        raise NeuroFluxError(f"model file {path} not found{hint}")
    path = path.resolve()
    mod_name = f"_neuroflux_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    mspec = importlib.util.spec_from_file_location(mod_name, path)
    if mspec is None or mspec.loader is None:
        raise NeuroFluxError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(mspec)
    sys.path.insert(0, str(path.parent))  # let the file import its neighbours
    try:
        sys.modules[mod_name] = module
        mspec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise NeuroFluxError(f"importing {path} raised {type(e).__name__}: {e}\n{_user_frames(e, path)}") from e
    finally:
        sys.path.remove(str(path.parent))
    mf = ModelFile(path=path, sha256=sha256_of(path), module=module, factory_name=factory, datasets_name=datasets)
    mf._get(factory, what="model factory")
    return mf


def _load_import(spec: str, *, factory: str | None, datasets: str) -> ModelFile:
    name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise NeuroFluxError(
            f"cannot import {name!r} for model {spec!r} ({e}); install the package, or give a model file path instead"
        ) from e
    except Exception as e:
        raise NeuroFluxError(f"importing {name} raised {type(e).__name__}: {e}") from e
    file = getattr(module, "__file__", None)
    if file is None:
        raise NeuroFluxError(f"{name} has no source file (a namespace package?); name a module with the factory in it")
    mf = ModelFile(
        path=Path(file).resolve(),
        sha256=sha256_of(file),
        module=module,
        factory_name=factory or attr,
        datasets_name=datasets,
        import_name=name,
    )
    mf._get(mf.factory_name, what="model factory")
    return mf


class ModelObject:
    """A model object (or a factory) and, optionally, its datasets, given
    in Python instead of a file: what ``neuroflux.plan`` and
    ``neuroflux.train`` take. ``build()`` returns a copy of the model, with
    the weights it has now; the object itself is never changed."""

    factory_name = "<object>"
    datasets_name = "<datasets>"
    source: Literal["object"] = "object"

    def __init__(
        self,
        model: nn.Module,
        *,
        datasets: tuple[Any, Any] | None = None,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise NeuroFluxError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._datasets = datasets
        self._input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self._num_classes = num_classes
        self._augment = augment
        cls = type(model)
        self.label = f"{cls.__module__}.{cls.__qualname__}"
        self.path = Path(f"<{cls.__qualname__} object>")
        self.sha256 = fingerprint(model)

    def build(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def build_fake(self, fake_mode) -> nn.Module:
        # Copy the module with every tensor replaced by a fake CPU tensor of its shape and dtype: no memory,
        # no real copy, and the same plan whether the object lives on a GPU, the CPU or the meta device.
        def fake(t: torch.Tensor) -> torch.Tensor:
            with fake_mode:
                return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")

        memo: dict[int, Any] = {}
        for p in self.model.parameters():
            memo[id(p)] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for b in self.model.buffers():
            memo[id(b)] = fake(b)
        return copy.deepcopy(self.model, memo)

    def has_datasets(self) -> bool:
        return self._datasets is not None

    def datasets(self) -> tuple[Any, Any]:
        if self._datasets is None:
            raise NeuroFluxError("no datasets were given with the model object; pass train_set and val_set")
        for part, ds in zip(("train", "val"), self._datasets):
            if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")) or len(ds) == 0:
                raise NeuroFluxError(f"the {part} set must be a non-empty map-style dataset")
        return self._datasets

    def input_shape(self) -> tuple[int, ...] | None:
        return self._input_shape

    def num_classes(self) -> int | None:
        return self._num_classes

    def augment(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._augment

    def constant(self, name: str) -> Any:
        return None


def _shape(value: Any, name: str, path: Path) -> tuple[int, ...]:
    """A declared sample shape as positive ints, or an error naming the constant."""
    try:
        shape = tuple(int(s) for s in value)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise NeuroFluxError(
            f"{path}: {name} = {value!r}; it must be one sample's shape, e.g. (3, 32, 32) for channels, height, width"
        )
    return shape


def _classes(value: Any, name: str, path: Path) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool):
        raise NeuroFluxError(f"{path}: {name} = {value!r}; it must be the number of classes, e.g. 10")
    return n


def _user_frames(e: BaseException, path: Path) -> str:
    """The traceback lines inside the user's file: where to look, no noise."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path]
    return "".join(f"  at {path.name}:{f.lineno} in {f.name}: {f.line}\n" for f in frames).rstrip()
