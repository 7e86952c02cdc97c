"""Thin gRPC servicers over the use cases (``gateway.usecases``)."""
