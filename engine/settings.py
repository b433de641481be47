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


# Checks a field declares with `check=`: value -> None when valid, else what the value must be. validate()
# (engine/config.py) runs them when the flags are parsed, so a bad value is named before anything is built.
def at_least(low):
    return lambda v: None if v >= low else f"must be >= {low}, got {v}"


def positive(v):
    return None if v > 0 else f"must be > 0, got {v}"


def fraction(v):
    return None if 0 <= v <= 1 else f"must be between 0 and 1, got {v}"


def one_of(*choices):
    return lambda v: None if v in choices else f"{v!r} is not one of {', '.join(choices)}"


def size_at_least(low):
    return lambda v: (None if min(v) >= low else
                      f"must be at least {low}x{low} (the models' output stride is 8), got {v[0]}x{v[1]}")
