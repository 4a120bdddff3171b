"""Loading a user's model file (``model.py`` or ``model.py:factory``).

The model-file contract (README, "Model files"): ``model() -> nn.Module``
(required), ``datasets() -> (train, val)`` (required to run), optional
``INPUT_SHAPE`` (C, H, W), ``NUM_CLASSES`` and ``augment(x) -> x``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from neuroflux.errors import NeuroFluxError

__all__ = ["ModelFile", "load_model_file", "sha256_of", "split_spec"]


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


@dataclass(frozen=True)
class ModelFile:
    path: Path
    sha256: str
    module: ModuleType
    factory_name: str
    datasets_name: str

    def build(self) -> nn.Module:
        """Call the factory; any exception becomes a NeuroFluxError with its reason."""
        fn = self._get(self.factory_name, what="model factory")
        try:
            model = fn()
        except Exception as e:
            raise NeuroFluxError(
                f"{self.path}: {self.factory_name}() raised {type(e).__name__}: {e}\n"
                f"{_user_frames(e, self.path)}"
            ) from e
        if not isinstance(model, nn.Module):
            raise NeuroFluxError(
                f"{self.path}: {self.factory_name}() returned {type(model).__name__}, expected a torch.nn.Module"
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
            return tuple(int(s) for s in own)
        if self.datasets_name == "datasets" and self.constant("INPUT_SHAPE") is not None:
            return tuple(int(s) for s in self.constant("INPUT_SHAPE"))
        return None

    def num_classes(self) -> int | None:
        """Declared classes: the factory's ``NUM_CLASSES`` attribute, else the
        file's ``NUM_CLASSES`` for the default factory ``model``, else None
        (then read from the model's output)."""
        own = getattr(self._get(self.factory_name, what="model factory"), "NUM_CLASSES", None)
        if own is not None:
            return int(own)
        if self.factory_name == "model" and self.constant("NUM_CLASSES") is not None:
            return int(self.constant("NUM_CLASSES"))
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
    """Import a model file by path. ``spec`` may be ``path.py:factory``."""
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
        raise NeuroFluxError(
            f"importing {path} raised {type(e).__name__}: {e}\n{_user_frames(e, path)}"
        ) from e
    finally:
        sys.path.remove(str(path.parent))
    mf = ModelFile(path=path, sha256=sha256_of(path), module=module, factory_name=factory, datasets_name=datasets)
    mf._get(factory, what="model factory")
    return mf


def _user_frames(e: BaseException, path: Path) -> str:
    """The traceback lines inside the user's file: where to look, no noise."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path]
    return "".join(f"  at {path.name}:{f.lineno} in {f.name}: {f.line}\n" for f in frames).rstrip()
