"""Models: a registry of named model classes and the folder format they save to."""

from xmodal.models.registry import create_model, list_registered, register_model

__all__ = ["create_model", "list_registered", "register_model"]
