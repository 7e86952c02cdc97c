"""Transport: gRPC in and out of one worker process.

Owns: the app factory (``app``: builds every part from ``Settings``), the
server lifecycle (``server``), the worker supervisor (``supervisor``), the
metrics page (``metrics``), the interceptors (``interceptors``: tickets,
request ids and access logs) and the thin servicers (``servicers``: protobuf
to use cases and back, errors to statuses at one boundary).

May import: everything below it (use cases, payments, ledger, domain,
security, config, errors) and the generated ``hongbao.v1``; servicers import
only the use cases, the domain's values and the boundary.
"""
