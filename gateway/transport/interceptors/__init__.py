"""Server interceptors, one per module, installed in this order (outermost first):

1. :mod:`gateway.transport.interceptors.logging` - request id and access log; outermost so that
   refused calls are logged too.
2. :mod:`gateway.transport.interceptors.auth` - ticket and scope check; sets
   :data:`~gateway.transport.interceptors.auth.current_claims` for the servicer.

What they share (reading the call, wrapping a handler's behaviour by RPC kind, prebuilt
rejections, context variables) is in :mod:`gateway.transport.interceptors._plumbing`, so
another interceptor is one new module holding only its policy.
"""

from gateway.transport.interceptors.auth import AuthInterceptor, claims, current_claims
from gateway.transport.interceptors.logging import LoggingInterceptor, configure_logging

__all__ = ["AuthInterceptor", "LoggingInterceptor", "claims", "configure_logging", "current_claims"]
