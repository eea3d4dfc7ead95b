"""Built-in models: small trained checkpoints and architectures elision ships with."""
from elision.models.registry import BuiltinModel, get_builtin, list_builtins, register_builtin

__all__ = ["BuiltinModel", "get_builtin", "list_builtins", "register_builtin"]
