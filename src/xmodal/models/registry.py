"""Register model classes by name and create them from a config (timm style).

A model class has a `config_class` (a dataclass) and takes one instance of it, plus the
prepared parts it names in `parts` (a trained text encoder, a vocabulary, a first stage).
`create_model(name, **values)` builds a complete model in one call.
Registration happens when the module defining the class is imported; the first lookup
imports every module of `xmodal.models`, so adding a model is adding its file.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from xmodal.typed_config import build_config

_REGISTRY: dict[str, type] = {}


def _import_models() -> None:
    """Import every module of `xmodal.models` once: registration happens on import, so a new
    model file registers itself without being listed anywhere (and `import xmodal` stays light)."""
    import pkgutil
    from pathlib import Path

    package = __name__.rpartition(".")[0]  # xmodal.models
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{package}.{info.name}")


def register_model(name: str):
    def decorator(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__name__}")
        if not dataclasses.is_dataclass(vars(cls).get("config_class")):
            raise TypeError(f"{cls.__name__} needs a dataclass `config_class` to be registered")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_registered() -> list[str]:
    _import_models()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type:
    if name not in _REGISTRY:
        _import_models()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_registered())}")
    return _REGISTRY[name]


def make_config(cls: type, values: dict[str, Any] | None = None):
    """Build `cls.config_class` from a dict; an unknown key is an error naming the valid ones."""
    return build_config(cls.config_class, dict(values or {}), f"model {cls.registry_name!r} config")


def create_model(name: str, **values: Any):
    """A complete model in one call: config fields by name, and prepared parts (`text_encoder=`
    a prepared encoder, `vocab=` a Vocabulary, `autoencoder=` a trained first stage) by the name
    in the class's `parts`. A part decides its own config fields; giving one of those fields a
    different value as well is an error, never silently overwritten."""
    cls = get_model_class(name)
    parts = {k: values.pop(k) for k in cls.parts if k in values and cls.is_part(k, values[k])}
    for key, value in cls.config_from_parts(parts).items():
        if key in values and values[key] != value:
            raise ValueError(f"model {name!r}: {key}={values[key]!r} given, but the prepared "
                             f"{' and '.join(parts)} set {key}={value!r}; leave {key} out")
        values[key] = value
    return cls(make_config(cls, values), **parts)
