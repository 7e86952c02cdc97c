"""Thin gRPC servicers over the domain layer (gateway.usecases)."""
