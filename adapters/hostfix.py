"""Deprecated: :func:`host_fixes` is a no-op kept for one release.

The torch-pruning work-arounds it used to install process-wide now live on the graph instances that
:func:`~orthoreg_tp.adapters.build_pruner` builds (:class:`~orthoreg_tp.adapters.graph.RobustDependencyGraph`);
see ``docs/adapters-manual-flow.md``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from .graph import INDEX_BUDGET, GroupExplosion

__all__ = ["INDEX_BUDGET", "GroupExplosion", "host_fixes"]


@contextlib.contextmanager
def host_fixes() -> Iterator[None]:
    """Deprecated no-op: build pruners with :func:`~orthoreg_tp.adapters.build_pruner` instead.

    Nothing is patched inside the block; a pruner built with ``tp.pruner.MetaPruner`` gets torch-pruning's own
    graph, bugs included.

    Example:
        >>> import warnings
        >>> from orthoreg_tp.adapters import host_fixes
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     with host_fixes():
        ...         pass
        >>> caught[0].category.__name__
        'DeprecationWarning'
    """
    warnings.warn(
        "orthoreg_tp.adapters.host_fixes() no longer does anything: build the pruner with "
        "orthoreg_tp.adapters.build_pruner(model, example_inputs, importance=..., ...) instead",
        DeprecationWarning,
        stacklevel=3,
    )
    yield
