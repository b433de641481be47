"""How a setting is declared: a dataclass field with its documentation, from which its flag is generated.

Used by the run configuration (engine/config.py) and by every method's own settings dataclass
(engine/methods/<method>.py); it imports nothing of the engine, so both can use it.
"""
import argparse
from dataclasses import field


def setting(default, doc, **extra):
    """A dataclass field with its documentation (shown as the flag's --help and in the README's CLI table).
    `parse=` names the function that turns the flag's text (and a saved config's value) into the value."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **extra})
    return field(default=default, metadata={"doc": doc, **extra})


def parse_size(text):
    """'512' -> (512, 512); '360,480' or '360x480' -> (360, 480) as (height, width)."""
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    parts = str(text).replace("x", ",").split(",")
    try:
        sizes = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512 or 360,480, got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 512 or 360,480, got {text!r}")
    return sizes
