# Type stubs for the Cython module hotpath._split (_split.pyx; its C contract is _split.pxd).
# mypy cannot read .pyx; `make lint` runs stubtest, which checks these against the build.

MAX_COUNT: int
DEFAULT_MAX_SHARE_FEN: int

def split_lucky(
    total_fen: int,
    count: int,
    max_share_fen: int = ...,
    seed: bytes | None = None,
    *,
    max_count: int = ...,
) -> list[int]: ...
def split_normal(
    total_fen: int, count: int, max_share_fen: int = ..., *, max_count: int = ...
) -> list[int]: ...
