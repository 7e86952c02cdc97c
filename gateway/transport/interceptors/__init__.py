"""Server interceptors, one per module, installed in this order (outermost first):

1. :mod:`gateway.transport.interceptors.logging` - request id and access log; outermost so that
   refused calls are logged too.
2. :mod:`gateway.transport.interceptors.auth` - ticket and scope check; sets
   :data:`~gateway.transport.interceptors.auth.current_claims` for the servicer.
"""

from gateway.transport.interceptors.auth import AuthInterceptor, claims, current_claims
from gateway.transport.interceptors.logging import LoggingInterceptor, configure_logging

__all__ = ["AuthInterceptor", "LoggingInterceptor", "claims", "configure_logging", "current_claims"]
