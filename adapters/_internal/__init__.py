"""Internals of :mod:`orthoreg_tp.adapters` (no stable API): tracing, the generic adapter, the session, host fixes.

Layers point down only: ``session`` -> ``describe`` / ``verify`` / ``host`` -> ``hostgraph``; ``tracing`` ->
``opaque`` -> ``autograd`` / ``layers``.
"""
