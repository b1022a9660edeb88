"""Width-free attention forwards: let an attention block's inner width differ from its input width.

Many attention blocks unpack their input width (``B, N, C = x.shape``) and reshape their heads with it:
``qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads)`` and ``out.reshape(B, N, C)``. Once head
dimensions are pruned the inner width is no longer ``C`` and the forward fails. :func:`width_free_class`
derives a subclass whose ``forward`` is the original source with two rewrites, each exact on the unpruned
block (a reshape with one dimension left to infer computes the same thing as one that spells it out):

- a ``.reshape(...)``/``.view(...)`` whose last argument is the unpacked width ``C`` gets ``-1`` there;
- one whose last argument is ``C // self.num_heads`` gets ``-1`` there;

and only when the call has no other ``-1``. The fix-up of an adapter switches the pruned block to that subclass
(``module.__class__ = ...``; the subclass lives in this module, so pickled models load again). Nothing of the
original class, of timm or of torch-pruning is modified.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import textwrap
from typing import Any

import torch.nn as nn

__all__ = ["rewrite_forward_source", "width_free_class", "switch_to_width_free"]

_UNPACK = re.compile(r"^\s*(\w+)\s*,\s*(\w+)\s*,\s*(?:(\w+)\s*,\s*)?(\w+)\s*=\s*x\.shape\s*$", re.M)
_PREFIX = "WidthFree"


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a call's argument text."""
    args, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i])
            start = i + 1
    args.append(text[start:])
    return [a.strip() for a in args if a.strip()]


def rewrite_forward_source(source: str) -> tuple[str, int]:
    r"""Rewrite reshapes that spell out the input width ``C`` (see the module docstring).

    Args:
        source: Source of a ``forward`` method (dedented).

    Returns:
        The rewritten source and the number of reshapes rewritten (0: nothing to do, no ``... = x.shape``
        unpacking to name the width, or a ``C // self.num_heads`` left that no rewrite covers).

    Example:
        >>> src = "def forward(self, x):\n    B, N, C = x.shape\n    return x.reshape(B, N, C)\n"
        >>> rewrite_forward_source(src)
        ('def forward(self, x):\n    B, N, C = x.shape\n    return x.reshape(B, N, -1)\n', 1)
    """
    unpack = _UNPACK.search(source)
    if unpack is None:
        return source, 0
    width = unpack.group(4)
    targets = {width, f"{width} // self.num_heads", f"{width}//self.num_heads"}
    out, pos, count = [], 0, 0
    for match in re.finditer(r"\.(?:reshape|view)\(", source):
        start = match.end()
        depth, end = 1, start
        while end < len(source) and depth:
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        inner = source[start : end - 1]
        args = _split_args(inner)
        if len(args) < 2 or args[-1] not in targets or "-1" in args[:-1] or start < pos:
            continue
        last = inner.rstrip().rstrip(",").rstrip()
        cut = start + len(last) - len(args[-1])
        out.append(source[pos:cut] + "-1")
        pos = start + len(last)
        count += 1
    out.append(source[pos:])
    rewritten = "".join(out)
    if re.search(rf"\b{re.escape(width)}\s*//\s*self\.num_heads", rewritten):
        return source, 0  # a head width still derived from C (e.g. next to another -1): cannot be made width-free
    return rewritten, count


def _encode(cls: type) -> str:
    return f"{_PREFIX}___{cls.__module__.replace('.', '__')}___{cls.__qualname__.replace('.', '__')}"


def _decode(name: str) -> type:
    _, module, qualname = name.split("___")
    obj: Any = importlib.import_module(module.replace("__", "."))
    for part in qualname.split("__"):
        obj = getattr(obj, part)
    return obj


@functools.cache
def width_free_class(cls: type) -> type | None:
    """The width-free subclass of attention class ``cls`` (``None``: no rewrite needed or possible).

    ``None`` also when the source is unavailable or the forward is a closure (``super()`` needs one).

    Example:
        >>> import timm.models.pvt_v2 as pvt
        >>> width_free_class(pvt.Attention).__name__
        'WidthFreeAttention'
    """
    forward = cls.__dict__.get("forward")
    if forward is None or forward.__code__.co_freevars:
        return None  # inherited forward, or a closure (super() needs __class__)
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError):
        return None
    new_source, count = rewrite_forward_source(source)
    if not count or "@" in source.split("def ", 1)[0]:
        return None  # nothing to do, or a decorated forward
    namespace: dict[str, Any] = {}
    exec(compile(new_source, f"<width-free {cls.__module__}.{cls.__qualname__}.forward>", "exec"),
         forward.__globals__, namespace)
    new_forward = namespace["forward"]
    new_forward.__defaults__ = forward.__defaults__
    name = _encode(cls)
    sub = type(f"{_PREFIX}{cls.__name__}", (cls,), {"forward": new_forward, "__module__": __name__})
    sub.__qualname__ = name
    globals()[name] = sub
    return sub


def __getattr__(name: str) -> type:  # unpickling: rebuild the subclass of a class named in the pickle
    if name.startswith(f"{_PREFIX}___"):
        sub = width_free_class(_decode(name))
        if sub is not None:
            return sub
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def switch_to_width_free(module: nn.Module) -> None:
    """Give ``module`` its width-free forward (no-op when it already has it).

    Raises:
        ValueError: The class's forward cannot be rewritten.

    Example:
        >>> import timm.models.pvt_v2 as pvt
        >>> attn = pvt.Attention(32, num_heads=2)
        >>> switch_to_width_free(attn)
        >>> isinstance(attn, pvt.Attention), type(attn).__name__
        (True, 'WidthFreeAttention')
    """
    cls = type(module)
    if cls.__module__ == __name__:
        return
    sub = width_free_class(cls)
    if sub is None:
        raise ValueError(f"{cls.__name__}.forward cannot be made width-free")
    module.__class__ = sub
