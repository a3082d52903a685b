"""Package exports imported on first use (PEP 562), so that importing a package costs only what is used.

``import plasticity_lightning`` and ``plasticity report`` then never load Lightning, transformers, torchvision or
scikit-learn unless something asks for a name that needs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose public ``exports`` map a name to the module defining it.

    Example::

        >>> getattr_, dir_ = lazy_exports("pkg", {}, {"sqrt": "math"})
        >>> getattr_("sqrt")(4.0)
        2.0
        >>> "sqrt" in dir_()
        True
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        imported = importlib.import_module(module)
        # a subpackage exported under its own name (``plasticity_lightning.policies``) is the module itself
        value = imported if module == f"{package}.{name}" else getattr(imported, name)
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
