"""Security: the unforgeable tickets minted at authentication (SPEC lesson 4).

Owns: ticket minting and verification, scopes and the key ring
(``tickets``). The interceptor that checks tickets on every call lives in
``gateway.transport.interceptors.auth``.

May import: ``gateway.errors`` and the standard library.
"""
