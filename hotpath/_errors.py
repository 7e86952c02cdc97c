"""Exceptions shared by both hot-path implementations.

Both subclass ValueError, so callers written against "raises ValueError" keep
working; the writer uses the subclasses to tell an ordinary outcome (the
envelope is sold out) from corrupt data (a record that fails its checks after
being read back), which is a bug to crash on, not a user error.
"""


class MalformedRecordError(ValueError):
    """A packed record failed its checks after being read back."""


class EnvelopeSoldOutError(ValueError):
    """claim_share was asked for a share of an envelope with none left."""


# Checks applied to records read back, by the names both implementations use.
_RECORD_PROBLEMS = {
    "short": "is {n} bytes, too short for its header",
    "length": "is {n} bytes, not the length its header implies",
    "count": "has count 0",
    "claimed": "has claimed > count",
    "remaining": "has remaining_fen outside 0..total_fen",
    "share": "has a share below 1 fen",
    "share_sum": "has shares that do not sum to total_fen",
    "amount": "has amount_fen below 1",
    "reserved": "has non-zero reserved bytes",
    "over_remaining": "has a next share larger than remaining_fen",
}


def record_error(problem, record, n):
    """The exception for a record that failed check `problem` (n = its length)."""
    if problem == "sold_out":
        return EnvelopeSoldOutError("envelope is sold out: every share is claimed")
    return MalformedRecordError(f"{record} record " + _RECORD_PROBLEMS[problem].format(n=n))
