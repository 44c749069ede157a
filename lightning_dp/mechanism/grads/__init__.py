"""Per-sample gradients: the interface (``engine.py``), the engines (``ghost.py``, ``hooks.py``,
``functorch.py``), their registry (``registry.py``), the check that they are right (``check.py``)
and choosing one for a model (``selection.py``)."""
