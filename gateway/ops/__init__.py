"""Operations: what a person runs.

Owns: the ``hongbao`` console script (``cli``), the Spring-Festival demo
(``demo``, its phases ``demo_story`` and ``demo_peak``, its report ``report``),
the multiprocess load generator the demo's peak and ``bench_overload`` share
(``loadgen``), reconcile on a ledger directory (``reconcile``), starting and
stopping the project's own processes (``procs``) and the benchmark runner
(``benchrun``).

May import: anything in ``gateway``; nothing else in ``gateway`` imports it.
"""
