"""The Lightning adapters: the strategies (``strategy.py``, ``ddp.py``) that own a private step
(``private_step.py``, hooks routed by ``routing.py``, manual optimization in ``manual.py``), and
the callbacks (``budget.py``, ``audit.py``, ``canary.py``). They meet through the small
interfaces of ``interfaces.py``: the strategies import no callback."""
