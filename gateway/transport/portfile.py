"""The port file a server writes once it is serving (port 0 picks a free port)."""

from __future__ import annotations

import os
import tempfile


def write_port_file(path: str | os.PathLike, port: int) -> None:
    """Writes a bound port atomically: a reader sees no file or the whole number."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".port-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
