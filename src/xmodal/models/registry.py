"""Register model classes by name and create them from a config (timm style).

A model class has a `config_class` (a dataclass) and takes one instance of it.
Registration happens when the module defining the class is imported; `_MODULES`
lists those modules so that `create_model` can find every built-in model
without importing them all at package import time.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

_REGISTRY: dict[str, type] = {}
# name -> module that registers it (imported on first use, keeps `import xmodal` light)
_MODULES: dict[str, str] = {
    "sat-captioner": "xmodal.models.sat_captioner",
    "transformer-captioner": "xmodal.models.transformer_captioner",
    "cvae": "xmodal.models.cvae",
    "dfgan": "xmodal.models.dfgan",
    "autoencoder": "xmodal.models.autoencoder",
    "latent-diffusion": "xmodal.models.diffusion",
    "clip": "xmodal.models.clip",
}


def register_model(name: str):
    def decorator(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__name__}")
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(f"{cls.__name__} needs a dataclass `config_class` to be registered")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _import_builtin(name: str) -> None:
    module = _MODULES.get(name)
    if module is not None and name not in _REGISTRY:
        importlib.import_module(module)


def list_registered() -> list[str]:
    for name in list(_MODULES):
        _import_builtin(name)
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type:
    _import_builtin(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_registered())}")
    return _REGISTRY[name]


def make_config(cls: type, values: dict[str, Any] | None = None):
    """Build `cls.config_class` from a dict; an unknown key is an error naming the valid ones."""
    values = dict(values or {})
    valid = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for model {cls.registry_name!r}; valid: {sorted(valid)}")
    return cls.config_class(**values)


def create_model(name: str, **config: Any):
    cls = get_model_class(name)
    return cls(make_config(cls, config))
