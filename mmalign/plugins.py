"""Where model kinds, algorithms and rewards come from: mmalign's own registration modules, then other packages'.

Each module below registers its entries in `mmalign.core.registry` when imported; an installed package can add
its own through the `mmalign.plugins` entry-point group (a module path), with no edit to mmalign.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN = (
    "mmalign.zoo.registry",  # the zoo:// paths of the offline worlds
    "mmalign.text.kinds",
    "mmalign.vision.kinds",
    "mmalign.speech.kinds",
    "mmalign.train.methods",
)
_loaded = False


def load() -> None:
    """Import every registration module once."""
    global _loaded
    if _loaded:
        return
    for name in BUILTIN:
        importlib.import_module(name)
    for entry in entry_points(group="mmalign.plugins"):
        entry.load()
    _loaded = True
