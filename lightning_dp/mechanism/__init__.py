"""The pieces of the DP-SGD mechanism, in the order a step uses them: Poisson sampling
(``sampling.py``) from never-replayed random streams (``streams.py``), per-example gradients
(``grads/``), clipping and noise (``gaussian.py``); and what models need for them
(``losses.py``: per-example losses, ``modules.py``: layers DP-SGD cannot train)."""
