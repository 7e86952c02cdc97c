"""Operations: what a person runs.

Owns: the ``hongbao`` console script (``cli``), the Spring-Festival demo
(``demo``), reconcile on a ledger directory (``reconcile``), starting and
stopping the project's own processes (``procs``) and the benchmark runner
(``benchrun``).

May import: anything in ``gateway``; nothing else in ``gateway`` imports it.
"""
