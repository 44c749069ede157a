"""The privacy core: no Lightning, no training loop. Mechanism events and the history of a run
(``events.py``, ``history.py``), the accountants and planning (``accounting.py``), attack risk
(``risk.py``), the plan's table of figures by step (``spend_table.py``), a budget any mechanism
spends from (``budget.py``), the integrity of saved ledgers (``integrity.py``), the one-run
audit's bound (``audit_bound.py``), and a dataset's budget across runs (``ledger.py``, with its
Renyi filter ``rdp_filter.py`` and searches charged once, ``tuning.py``)."""
