"""One behavioural suite for both hot-path implementations (Cython and the pure twin).

Tests taking the `impl` fixture run once per implementation; the cross-checks
compare the two directly, with the pure twin as the reference.
"""

import collections
import os
import random
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hotpath

IMPLEMENTATIONS = ("cython", "pure")
CY = hotpath.load("cython")
PURE = hotpath.load("pure")

# Bounded example counts keep the whole file well under 20 s on a busy CI box;
# no deadline because a loaded machine must not turn slowness into failures.
FAST = settings(deadline=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(deadline=None, max_examples=150,
                    suppress_health_check=[HealthCheck.too_slow])

I64_MAX = (1 << 63) - 1
I64_MIN = -(1 << 63)
SOLD_OUT_STATUS = 2


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def impl(request):
    return hotpath.load(request.param)


def outcome(fn, *args, **kwargs):
    """A call's result, or its exception type and message, for comparing implementations."""
    try:
        return ("ok", fn(*args, **kwargs))
    except (ValueError, TypeError, OverflowError) as exc:
        return (type(exc), str(exc))


@st.composite
def split_args(draw, max_count=100):
    count = draw(st.integers(1, max_count))
    max_share_fen = draw(st.sampled_from([1, 2, 3, 7, 100, 20000]) | st.integers(1, 50000))
    total_fen = draw(st.integers(count, max_share_fen * count))
    seed = draw(st.binary(max_size=40))
    return total_fen, count, max_share_fen, seed


# ------------------------------------------------------------------ package


def test_load_returns_the_same_api_for_both():
    """Both implementations expose exactly the names the package re-exports."""
    public = set(hotpath.__all__) - {"IMPLEMENTATION", "IMPLEMENTATIONS", "load"}
    for name in IMPLEMENTATIONS:
        namespace = hotpath.load(name)
        assert name == namespace.IMPLEMENTATION
        assert set(vars(namespace)) >= public
    assert os.environ.get("HONGBAO_HOTPATH", "cython") == hotpath.IMPLEMENTATION


def test_load_rejects_unknown_names():
    """load() names the valid choices instead of guessing."""
    with pytest.raises(ValueError, match="cython, pure"):
        hotpath.load("rust")


def test_constants_match_the_product_rules(impl):
    """The gate answers and record sizes are the contract's values."""
    assert (impl.GATE_SOLD_OUT, impl.GATE_ALREADY, impl.GATE_UNTRACKED) == (-1, -2, -3)
    assert (impl.MAX_COUNT, impl.DEFAULT_MAX_SHARE_FEN) == (100, 20000)
    assert (impl.ENVELOPE_HEADER_SIZE, impl.GRAB_RECORD_SIZE, impl.TRANSFER_HEADER_SIZE) == (
        40, 40, 20)


# ------------------------------------------------------------------ split


@FAST
@given(args=split_args())
def test_split_lucky_shares_sum_exactly_within_bounds(impl, args):
    """LUCKY gives count shares, each in 1..max_share_fen, summing to total_fen exactly."""
    total_fen, count, max_share_fen, seed = args
    shares = impl.split_lucky(total_fen, count, max_share_fen, seed=seed)
    assert len(shares) == count
    assert sum(shares) == total_fen
    assert all(type(s) is int and 1 <= s <= max_share_fen for s in shares)


@FAST
@given(args=split_args())
def test_split_lucky_follows_the_double_mean_rule(impl, args):
    """Every share but the last lies in the clamped [lo, hi] range of the double-mean rule."""
    total_fen, count, max_share_fen, seed = args
    shares = impl.split_lucky(total_fen, count, max_share_fen, seed=seed)
    remaining = total_fen
    for i, share in enumerate(shares[:-1]):
        left = count - i
        lo = max(1, remaining - max_share_fen * (left - 1))
        hi = max(lo, min(2 * remaining // left, max_share_fen, remaining - (left - 1)))
        assert lo <= share <= hi
        remaining -= share
    assert shares[-1] == remaining


@THOROUGH
@given(args=split_args())
def test_split_lucky_same_seed_same_shares_in_both(args):
    """An explicit seed reproduces the split, identically in Cython and the pure twin."""
    total_fen, count, max_share_fen, seed = args
    shares = CY.split_lucky(total_fen, count, max_share_fen, seed=seed)
    assert shares == CY.split_lucky(total_fen, count, max_share_fen, seed=seed)
    assert shares == PURE.split_lucky(total_fen, count, max_share_fen, seed=seed)


def test_split_lucky_known_vectors(impl):
    """The seed derivation and PRNG are pinned: these seeds always give these shares."""
    assert impl.split_lucky(1000, 10, seed=b"hongbao") == [
        21, 180, 84, 32, 218, 19, 130, 53, 130, 133]
    assert impl.split_lucky(888, 8, 200, seed=bytes(range(32))) == [
        6, 70, 145, 117, 192, 109, 123, 126]


def test_pure_xoshiro_matches_the_reference_outputs():
    """The twin's xoshiro256** gives the published outputs for state (1, 2, 3, 4)."""
    from hotpath._pure_split import _Xoshiro256

    rng = _Xoshiro256(b"")
    rng.s0, rng.s1, rng.s2, rng.s3 = 1, 2, 3, 4
    assert [rng.next() for _ in range(4)] == [11520, 0, 1509978240, 1215971899390074240]


def test_split_lucky_without_seed_is_unpredictable(impl):
    """Unseeded splits draw fresh randomness, so two splits of one envelope differ."""
    splits = {tuple(impl.split_lucky(20000, 100)) for _ in range(5)}
    assert len(splits) == 5


def test_split_lucky_draws_are_uniform(impl):
    """A first share drawn from 1..10 hits each value about equally (no modulo bias)."""
    draws = 4000
    counts = collections.Counter(
        impl.split_lucky(11, 2, seed=i.to_bytes(4, "little"))[0] for i in range(draws))
    assert set(counts) == set(range(1, 11))
    expected = draws / 10
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 30  # 9 degrees of freedom: p < 0.0005 if uniform


@FAST
@given(count=st.integers(1, 100), share=st.integers(1, 20000))
def test_split_normal_gives_equal_shares(impl, count, share):
    """NORMAL splits into count equal shares."""
    assert impl.split_normal(share * count, count) == [share] * count


@pytest.mark.parametrize("fn", ["split_lucky", "split_normal"])
@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((100, 0), {}, "count must be in 1..100"),
    ((1000, 101), {}, "count must be in 1..100"),
    ((5, 10), {}, "below count"),
    ((20001, 1), {}, "exceeds max_share_fen"),
    ((301, 3, 100), {}, "exceeds max_share_fen"),
    ((100, 1, 0), {}, "max_share_fen must be in"),
    ((100, 2), {"max_count": 1}, "count must be in 1..1,"),
    ((100, 2), {"max_count": 0}, "max_count must be in"),
])
def test_split_rejects_invalid_envelopes(impl, fn, args, kwargs, message):
    """Both splits refuse impossible envelopes with a ValueError that says why."""
    with pytest.raises(ValueError, match=message):
        getattr(impl, fn)(*args, **kwargs)


def test_split_max_count_keyword_raises_the_limit(impl):
    """max_count lets a deployment allow larger envelopes than the default 100."""
    assert len(impl.split_lucky(500, 500, seed=b"s", max_count=500)) == 500
    assert impl.split_normal(500, 250, max_count=250) == [2] * 250


def test_split_normal_needs_an_even_split(impl):
    """NORMAL refuses a total that does not divide evenly."""
    with pytest.raises(ValueError, match="divide evenly"):
        impl.split_normal(101, 10)


@pytest.mark.parametrize("bad", [
    (100.0, 10), (100, 10.0), (100, 10, 20000.0),
])
def test_split_refuses_floats(impl, bad):
    """Money is integer fen: a float argument is a TypeError, never rounded."""
    with pytest.raises(TypeError):
        impl.split_lucky(*bad)


@FAST
@given(total_fen=st.integers(-5, 2_100_000), count=st.integers(-2, 110),
       max_share_fen=st.integers(-1, 30000), even=st.booleans())
def test_split_validation_agrees_across_implementations(total_fen, count, max_share_fen, even):
    """For any arguments both implementations give the same shares or the same error."""
    if even:
        assert outcome(CY.split_normal, total_fen, count, max_share_fen) == outcome(
            PURE.split_normal, total_fen, count, max_share_fen)
    else:
        assert outcome(CY.split_lucky, total_fen, count, max_share_fen, b"k") == outcome(
            PURE.split_lucky, total_fen, count, max_share_fen, b"k")


# ------------------------------------------------------------------ gate


def test_gate_admits_each_user_once_in_slot_order(impl):
    """Distinct users get slots 0, 1, 2, ...; a repeat is ALREADY; an unknown envelope UNTRACKED."""
    gate = impl.GrabGate()
    gate.track(b"env", 3)
    assert [gate.admit(b"env", u) for u in (b"a", b"b", b"a", b"c", b"d")] == [
        0, 1, impl.GATE_ALREADY, 2, 3]   # slot 3 >= count: oversubscribed, still forwarded
    assert gate.admit(b"other", b"a") == impl.GATE_UNTRACKED


@FAST
@given(users=st.lists(st.binary(min_size=1, max_size=12), max_size=150),
       count=st.integers(1, 100))
def test_gate_never_gives_a_slot_twice(impl, users, count):
    """Without releases the slots handed out are exactly 0..k-1, one per distinct user."""
    gate = impl.GrabGate()
    gate.track(b"env", count)
    capacity = max(8, 1 << (2 * count - 1).bit_length())
    answers = [gate.admit(b"env", u) for u in users]
    slots = [a for a in answers if a >= 0]
    assert sorted(slots) == list(range(len(slots)))
    if len(set(users)) <= capacity:   # a full table answers as if the user were new
        assert len(slots) == len(set(users))


def _hammer(gate, users, threads, batch):
    barrier = threading.Barrier(threads)
    results = [None] * threads

    def worker(i):
        order = list(users)
        random.Random(i).shuffle(order)
        barrier.wait()
        if batch:
            results[i] = list(zip(order, gate.admit_many(b"env", order), strict=True))
        else:
            results[i] = [(u, gate.admit(b"env", u)) for u in order]

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    return [pair for result in results for pair in result]


@pytest.mark.parametrize("batch", [False, True], ids=["admit", "admit_many"])
def test_gate_one_admit_per_user_under_threads(impl, batch):
    """Threads racing to admit the same users let exactly one admit per user through."""
    users = [f"user-{i}".encode() for i in range(1000)]
    gate = impl.GrabGate()
    gate.track(b"env", 1000)
    passed = [(u, a) for u, a in _hammer(gate, users, threads=8, batch=batch) if a >= 0]
    assert sorted(u for u, _ in passed) == sorted(users)
    assert sorted(a for _, a in passed) == list(range(len(users)))


def test_gate_sold_out_is_sticky(impl):
    """Once sold out, every admit is SOLD_OUT and no refresh can clear the flag."""
    gate = impl.GrabGate()
    gate.track(b"env", 5)
    assert not gate.is_sold_out(b"env")
    gate.mark_sold_out(b"env")
    gate.track(b"env", 5, claimed=1, sold_out=False)
    assert gate.is_sold_out(b"env")
    assert gate.admit(b"env", b"new-user") == impl.GATE_SOLD_OUT
    gate.track(b"full", 2, claimed=2)   # claimed == count is sold out too
    assert gate.admit(b"full", b"u") == impl.GATE_SOLD_OUT
    assert not gate.is_sold_out(b"untracked")


@pytest.mark.parametrize("how", ["mark_sold_out", "track", "admit_many"])
def test_gate_frees_a_sold_out_envelopes_users(impl, how):
    """A sold-out envelope keeps its flag, not its user table; later calls are no-ops."""
    gate = impl.GrabGate()
    gate.track(b"live", 100)
    gate.track(b"env", 100)
    live_bytes = gate.table_bytes() // 2
    assert live_bytes == 256 * 8   # 2 * 100 shares, rounded up to a power of two
    users = [b"u%d" % i for i in range(100)]
    if how == "admit_many":        # big enough to probe without the GIL
        assert gate.admit_many(b"env", users) == list(range(100))
        assert gate.table_bytes() == 2 * live_bytes   # not sold out by admits alone
        gate.mark_sold_out(b"env")
    elif how == "track":
        gate.track(b"env", 100, claimed=100)
    else:
        gate.mark_sold_out(b"env")
    assert gate.table_bytes() == live_bytes
    assert gate.admit(b"env", b"u1") == impl.GATE_SOLD_OUT
    assert gate.admit_many(b"env", users) == [impl.GATE_SOLD_OUT] * 100
    gate.release(b"env", b"u1")
    gate.mark_user(b"env", b"u2")
    gate.track(b"env", 100, claimed=3, users=[b"u3"])
    assert gate.is_sold_out(b"env") and gate.table_bytes() == live_bytes
    assert gate.admit(b"live", b"u1") == 0   # the other envelope is untouched


def test_gate_holds_no_tables_for_many_sold_out_envelopes(impl):
    """20,000 finished envelopes of 100 shares: no user table left, each still answers."""
    gate = impl.GrabGate()
    for i in range(20_000):
        env = b"e%d" % i
        gate.track(env, 100)
        gate.admit_many(env, [b"u%d" % k for k in range(100)])
        gate.mark_sold_out(env)
    assert gate.table_bytes() == 0 and len(gate) == 20_000
    assert gate.admit(b"e7", b"u0") == impl.GATE_SOLD_OUT


def test_gate_release_undoes_an_admit(impl):
    """release() unmarks the user and returns the provisional slot; a stray release is a no-op."""
    gate = impl.GrabGate()
    gate.track(b"env", 10)
    assert gate.admit(b"env", b"a") == 0
    assert gate.admit(b"env", b"b") == 1
    gate.release(b"env", b"b")
    gate.release(b"env", b"b")           # twice: nothing more to undo
    gate.release(b"env", b"never-seen")  # unknown user: nothing to undo
    gate.release(b"nope", b"a")          # untracked envelope: nothing to undo
    assert gate.admit(b"env", b"b") == 1
    assert gate.admit(b"env", b"a") == impl.GATE_ALREADY
    assert gate.admit(b"env", b"c") == 2


def test_gate_track_refreshes_from_the_ledger(impl):
    """track() raises reserved to claimed (never lowers it) and marks the given users."""
    gate = impl.GrabGate()
    gate.track(b"env", 10, claimed=3, users=[b"a", b"b"])
    assert gate.admit(b"env", b"a") == impl.GATE_ALREADY
    assert gate.admit(b"env", b"c") == 3
    gate.track(b"env", 10, claimed=1)
    assert gate.admit(b"env", b"d") == 4
    gate.track(b"env", 10, claimed=7)
    assert gate.admit(b"env", b"e") == 7
    gate.mark_user(b"env", b"f")
    assert gate.admit(b"env", b"f") == impl.GATE_ALREADY


def test_gate_rejects_a_changed_count_and_bad_keys(impl):
    """An envelope's count never changes, and keys are bytes only."""
    gate = impl.GrabGate()
    gate.track(b"env", 10)
    with pytest.raises(ValueError, match="count"):
        gate.track(b"env", 11)
    with pytest.raises(ValueError):
        gate.track(b"env2", 0)
    with pytest.raises(ValueError):
        gate.track(b"env2", 5, claimed=6)
    with pytest.raises(TypeError):
        gate.admit("env", b"u")
    with pytest.raises(TypeError):
        gate.admit(b"env", "u")
    with pytest.raises(ValueError):
        impl.GrabGate(0)


def test_gate_full_table_answers_as_new(impl):
    """A user table with no free slot lets users through unmarked; the writer decides."""
    gate = impl.GrabGate()
    gate.track(b"env", 1)   # 8 slots
    assert [gate.admit(b"env", bytes([i])) for i in range(8)] == list(range(8))
    assert gate.admit(b"env", b"late") == 8
    assert gate.admit(b"env", b"late") == 9   # not marked, so not ALREADY
    assert gate.admit(b"env", bytes([0])) == impl.GATE_ALREADY


@FAST
@given(max_envelopes=st.integers(1, 6),
       ops=st.lists(st.tuples(st.sampled_from(["track", "forget"]), st.integers(0, 9)),
                    max_size=60))
def test_gate_evicts_the_oldest_tracked_envelope(impl, max_envelopes, ops):
    """At most max_envelopes are tracked; beyond that the first-tracked one goes (FIFO)."""
    gate = impl.GrabGate(max_envelopes)
    model = collections.OrderedDict()
    for op, i in ops:
        key = b"e%d" % i
        if op == "track":
            gate.track(key, 3)
            if key not in model:
                model[key] = True
                while len(model) > max_envelopes:
                    model.popitem(last=False)
        else:
            gate.forget(key)
            model.pop(key, None)
        assert len(gate) <= max_envelopes
        assert len(gate) == len(model)
        assert all(k in gate for k in model)


def test_gate_eviction_bound_holds_at_scale(impl):
    """Tracking many more envelopes than the bound keeps only the newest max_envelopes."""
    gate = impl.GrabGate(100)
    for i in range(5000):
        gate.track(b"e%d" % i, 2)
        if i % 3 == 0:
            gate.forget(b"e%d" % (i - 1))
    assert len(gate) == 100
    assert b"e4999" in gate and b"e0" not in gate
    assert gate.admit(b"e0", b"u") == impl.GATE_UNTRACKED


_GATE_OPS = st.lists(st.tuples(
    st.sampled_from(["track", "admit", "admit_many", "release", "mark_sold_out",
                     "mark_user", "forget", "is_sold_out", "table_bytes"]),
    st.integers(0, 3),          # envelope; its count is envelope + 1 (8-slot tables)
    st.integers(0, 12),         # user: 13 of them, enough to fill a table
    st.integers(0, 4),          # claimed
    st.booleans(),              # sold_out
), max_size=80)


@THOROUGH
@given(max_envelopes=st.integers(1, 4), ops=_GATE_OPS)
def test_gate_behaves_like_the_pure_twin(max_envelopes, ops):
    """Any sequence of gate operations gives the same answers in Cython as in the twin."""
    gates = [CY.GrabGate(max_envelopes), PURE.GrabGate(max_envelopes)]
    for op, e, u, claimed, sold_out in ops:
        env, user = b"env%d" % e, b"user%d" % u
        if op == "track":
            args = (env, e + 1, min(claimed, e + 1), sold_out, [user])
        elif op == "admit_many":
            args = (env, [b"user%d" % ((u + k) % 13) for k in range(70)])
        elif op in ("mark_sold_out", "forget", "is_sold_out"):
            args = (env,)
        elif op == "table_bytes":
            args = ()
        else:
            args = (env, user)
        results = [outcome(getattr(g, op), *args) for g in gates]
        assert results[0] == results[1], (op, args)
        assert len(gates[0]) == len(gates[1])


# ------------------------------------------------------------------ records


@st.composite
def envelopes(draw):
    count = draw(st.integers(1, 100))
    max_share_fen = draw(st.sampled_from([1, 200, 20000]))
    total_fen = draw(st.integers(count, max_share_fen * count))
    shares = PURE.split_lucky(total_fen, count, max_share_fen, seed=draw(st.binary(max_size=8)))
    claimed = draw(st.integers(0, count))
    return (total_fen, total_fen - sum(shares[:claimed]),
            draw(st.integers(I64_MIN, I64_MAX)), draw(st.integers(I64_MIN, I64_MAX)),
            count, claimed, draw(st.integers(0, 255)), draw(st.integers(0, 255)),
            draw(st.integers(0, 65535)), tuple(shares))


@FAST
@given(fields=envelopes())
def test_envelope_round_trips(impl, fields):
    """pack_envelope then unpack_envelope gives the fields back; the header alone too."""
    buf = impl.pack_envelope(*fields)
    assert len(buf) == 40 + 4 * fields[4]
    assert buf[:40] == struct.pack("<qqqqHHBBH", *fields[:9])
    assert impl.unpack_envelope(buf) == fields
    assert impl.envelope_header(buf) == fields[:9]
    assert impl.unpack_envelope(memoryview(buf)) == fields
    assert impl.envelope_header(bytearray(buf)) == fields[:9]


@FAST
@given(fields=envelopes())
def test_records_pack_identically_in_both(fields):
    """Both implementations write byte-identical records."""
    assert CY.pack_envelope(*fields) == PURE.pack_envelope(*fields)
    grab = (fields[0], fields[2], fields[4], fields[6], bytes(range(16)))
    assert CY.pack_grab(*grab) == PURE.pack_grab(*grab)
    transfer = (fields[0], fields[2], fields[6], b"w:" + bytes(fields[5]), b"e:x", b"ref")
    assert CY.pack_transfer(*transfer) == PURE.pack_transfer(*transfer)


@FAST
@given(seed=st.binary(max_size=8), count=st.integers(1, 100))
def test_claim_share_walks_a_whole_envelope(impl, seed, count):
    """claim_share hands out shares in order until sold out, then raises EnvelopeSoldOutError."""
    total_fen = 300 * count
    shares = impl.split_lucky(total_fen, count, seed=seed)
    buf = impl.pack_envelope(total_fen, total_fen, 7, 8, count, 0, 1, 1, 0, shares)
    taken = []
    for i in range(count):
        buf, index, amount_fen = impl.claim_share(buf, SOLD_OUT_STATUS)
        taken.append(amount_fen)
        header = impl.envelope_header(buf)
        assert index == i
        assert header[5] == i + 1
        assert header[1] == total_fen - sum(taken)
        assert header[7] == (SOLD_OUT_STATUS if i == count - 1 else 1)
    assert taken == shares
    assert impl.unpack_envelope(buf)[9] == tuple(shares)
    with pytest.raises(impl.EnvelopeSoldOutError):
        impl.claim_share(buf, SOLD_OUT_STATUS)
    with pytest.raises(ValueError, match="sold out"):
        impl.claim_share(buf, SOLD_OUT_STATUS)


def test_claim_share_accepts_any_bytes_like(impl):
    """claim_share reads memoryviews and bytearrays (LMDB buffers) and returns bytes."""
    buf = impl.pack_envelope(30, 30, 0, 0, 3, 0, 0, 0, 0, [10, 15, 5])
    for view in (memoryview(buf), bytearray(buf)):
        new_buf, index, amount_fen = impl.claim_share(view, SOLD_OUT_STATUS)
        assert type(new_buf) is bytes
        assert (index, amount_fen) == (0, 10)
    with pytest.raises(ValueError, match="status_sold_out"):
        impl.claim_share(buf, 256)


def _envelope_with(shares=(10, 15, 5), **changes):
    """Raw envelope bytes, bypassing pack_envelope's checks, to test the reader's."""
    fields = dict(total_fen=30, remaining_fen=30, created_at_ms=1, expires_at_ms=2, count=3,
                  claimed=0, kind=0, status=0, flags=0)
    fields.update(changes)
    return struct.pack("<qqqqHHBBH", *fields.values()) + struct.pack(f"<{len(shares)}i", *shares)


@pytest.mark.parametrize(("buf", "problem"), [
    (b"", "too short"),
    (_envelope_with()[:39], "too short"),
    (_envelope_with()[:-1], "not the length"),
    (_envelope_with() + b"\0", "not the length"),
    (_envelope_with(count=0, shares=[]), "count 0"),
    (_envelope_with(claimed=4), "claimed > count"),
    (_envelope_with(remaining_fen=31), "remaining_fen outside"),
    (_envelope_with(remaining_fen=-1), "remaining_fen outside"),
    (_envelope_with(shares=[10, 20, 0]), "share below 1"),
    (_envelope_with(shares=[10, 21, -1]), "share below 1"),
    (_envelope_with(shares=[10, 15, 6]), "do not sum"),
])
def test_unpack_envelope_rejects_malformed_records(impl, buf, problem):
    """A record read back that breaks the layout or the money invariants is MalformedRecordError."""
    with pytest.raises(impl.MalformedRecordError, match=problem):
        impl.unpack_envelope(buf)
    assert issubclass(impl.MalformedRecordError, ValueError)


def test_claim_share_rejects_malformed_records(impl):
    """claim_share checks the header and the share it takes before writing anything."""
    with pytest.raises(impl.MalformedRecordError, match="not the length"):
        impl.claim_share(_envelope_with()[:-2], SOLD_OUT_STATUS)
    with pytest.raises(impl.MalformedRecordError, match="larger than remaining"):
        impl.claim_share(_envelope_with(remaining_fen=9), SOLD_OUT_STATUS)
    with pytest.raises(impl.MalformedRecordError, match="share below 1"):
        impl.claim_share(_envelope_with(shares=[0, 25, 5]), SOLD_OUT_STATUS)


@FAST
@given(data=st.binary(max_size=120))
def test_readers_agree_on_arbitrary_bytes(data):
    """On any bytes both implementations decode the same values or raise the same error."""
    for name in ("unpack_envelope", "envelope_header", "unpack_grab", "unpack_transfer",
                 "unpack_i64"):
        assert outcome(getattr(CY, name), data) == outcome(getattr(PURE, name), data), name
    assert outcome(CY.claim_share, data, 2) == outcome(PURE.claim_share, data, 2)


@pytest.mark.parametrize(("changes", "message"), [
    ({"count": 0, "shares": []}, "count must be in 1..65535"),
    ({"claimed": 4}, "claimed must be in 0..3"),
    ({"kind": 256}, "kind must be in 0..255"),
    ({"status": -1}, "status must be in 0..255"),
    ({"flags": 65536}, "flags must be in 0..65535"),
    ({"remaining_fen": 31}, "remaining_fen must be in 0..30"),
    ({"shares": [10, 20]}, "got 2 shares for count 3"),
    ({"shares": [10, 20, 0]}, "share 2 is 0 fen"),
    ({"shares": [10, 15, 6]}, "shares sum to 31 fen"),
    ({"total_fen": 1 << 40, "remaining_fen": 0, "shares": [1 << 38] * 3}, "outside 1..2147483647"),
])
def test_pack_envelope_checks_before_writing(impl, changes, message):
    """pack_envelope refuses fields that do not fit the layout or do not add up."""
    fields = dict(total_fen=30, remaining_fen=30, created_at_ms=1, expires_at_ms=2, count=3,
                  claimed=0, kind=0, status=0, flags=0, shares=[10, 15, 5])
    fields.update(changes)
    with pytest.raises(ValueError, match=message):
        impl.pack_envelope(**fields)


@FAST
@given(amount_fen=st.integers(1, I64_MAX), at_ms=st.integers(I64_MIN, I64_MAX),
       share_index=st.integers(0, 65535), flags=st.integers(0, 255),
       digest=st.binary(min_size=16, max_size=16))
def test_grab_round_trips(impl, amount_fen, at_ms, share_index, flags, digest):
    """pack_grab then unpack_grab gives the five fields back, in the `<qqHBB4x16s` layout."""
    buf = impl.pack_grab(amount_fen, at_ms, share_index, flags, digest)
    assert buf == struct.pack("<qqHBB4x16s", amount_fen, at_ms, share_index, flags, 0, digest)
    assert impl.unpack_grab(buf) == (amount_fen, at_ms, share_index, flags, digest)


def test_grab_checks_both_ways(impl):
    """Grabs refuse bad fields when packed and bad bytes when read back."""
    digest = bytes(16)
    for args in [(0, 1, 0, 0, digest), (1, 1, 65536, 0, digest), (1, 1, 0, 256, digest),
                 (1, 1, 0, 0, bytes(15))]:
        with pytest.raises(ValueError):
            impl.pack_grab(*args)
    good = impl.pack_grab(5, 1, 0, 1, digest)
    for bad, problem in [(good[:-1], "not the length"),
                         (struct.pack("<q", 0) + good[8:], "amount_fen below 1"),
                         (good[:19] + b"\x01" + good[20:], "reserved"),
                         (good[:22] + b"\x01" + good[23:], "reserved")]:
        with pytest.raises(impl.MalformedRecordError, match=problem):
            impl.unpack_grab(bad)


@FAST
@given(amount_fen=st.integers(1, I64_MAX), at_ms=st.integers(I64_MIN, I64_MAX),
       kind=st.integers(0, 255), debit=st.binary(max_size=255),
       credit=st.binary(max_size=255), ref=st.binary(max_size=255))
def test_transfer_round_trips(impl, amount_fen, at_ms, kind, debit, credit, ref):
    """pack_transfer then unpack_transfer gives the six fields back."""
    buf = impl.pack_transfer(amount_fen, at_ms, kind, debit, credit, ref)
    assert buf[:20] == struct.pack("<qqBBBB", amount_fen, at_ms, kind, len(debit),
                                   len(credit), len(ref))
    assert impl.unpack_transfer(buf) == (amount_fen, at_ms, kind, debit, credit, ref)


def test_transfer_checks_both_ways(impl):
    """Transfers need a positive amount and fields of at most 255 bytes, and read back whole."""
    with pytest.raises(ValueError, match="amount_fen"):
        impl.pack_transfer(0, 1, 0, b"a", b"b", b"r")
    with pytest.raises(ValueError, match="over 255"):
        impl.pack_transfer(1, 1, 0, b"a" * 256, b"b", b"r")
    with pytest.raises(TypeError):
        impl.pack_transfer(1, 1, 0, "a", b"b", b"r")
    good = impl.pack_transfer(5, 1, 2, b"debit", b"credit", b"ref")
    for bad, problem in [(good[:19], "too short"), (good[:-1], "not the length"),
                         (good + b"x", "not the length"),
                         (struct.pack("<q", -5) + good[8:], "amount_fen below 1")]:
        with pytest.raises(impl.MalformedRecordError, match=problem):
            impl.unpack_transfer(bad)


@FAST
@given(v=st.integers(I64_MIN, I64_MAX))
def test_i64_round_trips(impl, v):
    """pack_i64 is `<q` and unpack_i64 inverts it."""
    assert impl.pack_i64(v) == struct.pack("<q", v)
    assert impl.unpack_i64(impl.pack_i64(v)) == v


def test_i64_rejects_out_of_range_and_wrong_lengths(impl):
    """Values outside int64 overflow loudly; a buffer that is not 8 bytes is malformed."""
    with pytest.raises(OverflowError):
        impl.pack_i64(1 << 63)
    with pytest.raises(impl.MalformedRecordError):
        impl.unpack_i64(bytes(7))


@FAST
@given(a=st.integers(I64_MIN, I64_MAX), b=st.integers(I64_MIN, I64_MAX))
def test_add_fen_is_exact_or_overflows(impl, a, b):
    """add_fen returns a + b when it fits int64 and raises OverflowError otherwise."""
    if I64_MIN <= a + b <= I64_MAX:
        assert impl.add_fen(a, b) == a + b
    else:
        with pytest.raises(OverflowError):
            impl.add_fen(a, b)


@pytest.mark.parametrize(("balance_fen", "amount_fen", "ok"), [
    (100, 100, True), (100, 1, True), (100, 101, False), (100, 0, False),
    (100, -5, False), (0, 0, False), (-1, 1, False), (I64_MAX, I64_MAX, True),
])
def test_debit_ok_needs_a_positive_covered_amount(impl, balance_fen, amount_fen, ok):
    """A debit is allowed only for a positive amount the balance covers."""
    assert impl.debit_ok(balance_fen, amount_fen) is ok
