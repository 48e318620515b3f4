"""A class named in a config by its path, imported and checked, or one message naming the option."""

import importlib


def class_at(path: str, base: type, option: str, what: str, default_module: str = "") -> type:
    """The class at ``path`` (``package.module.Class``; a bare ``Class`` is ``default_module``'s), a subclass of
    ``base``.

    Raises:
        ValueError: naming ``option``, the path and what it had to be (``what``: "a dataset class").
    """
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or default_module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"Expected `{option}` to be {what}, but {path} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"Expected `{option}` to be {what} (a {base.__module__}.{base.__qualname__}), but got {path}")
    return cls
