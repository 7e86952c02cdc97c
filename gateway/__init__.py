"""The hongbao gateway, in layers; each subpackage's docstring says what it owns.

From the bottom: ``domain`` (the money rules, no I/O), ``ledger`` (the
contract and its LMDB and memory backends), ``payments`` (bank link, butler,
resolver), ``usecases`` (what the gateway does), ``transport`` (gRPC),
``ops`` (CLI, demo, reconcile). Beside them: ``security`` (tickets),
``config`` (settings), ``errors`` (the one error hierarchy), ``loops`` and
``client`` (the Python client of the API). A layer imports only from below.
"""
