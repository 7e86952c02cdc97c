"""Settings: every limit and default of the gateway in one place.

Defaults follow SPEC.md; a TOML file (``hongbao serve --config FILE``) may
override any field by name, and command-line flags override the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from gateway.qos.controller import ControllerOptions
from gateway.qos.tiers import tier_table


@dataclasses.dataclass(slots=True)
class Settings:
    # Envelope rules.
    max_count: int = 100
    max_share_fen: int = 20_000
    default_expiry_s: int = 86_400
    max_expiry_s: int = 7 * 86_400
    max_greeting_chars: int = 64
    # Wallet movements through a bank card.
    max_top_up_fen: int = 5_000_000
    banks: tuple[str, ...] = ("icbc", "ccb", "abc", "boc")
    bank_timeout_s: float = 3.0
    # Calls per second each bank is known to take; the payment butler keeps
    # traffic within it. A bank missing here gets `default_bank_capacity_tps`.
    bank_capacity_tps: dict = dataclasses.field(default_factory=dict)
    default_bank_capacity_tps: float = 1000.0
    # The channels each bank is reached through, in order of preference (the butler moves a
    # new payment to the next one when one is failing or full), and a channel's own
    # capacity for every bank where it differs from the bank's (e.g. `clearing = 500`).
    bank_channels: tuple[str, ...] = ("direct", "clearing")
    channel_capacity_tps: dict = dataclasses.field(default_factory=dict)
    # A channel with calls out and no definite answer for this long gets no new calls
    # while another channel can take them (it went silent; its calls end at their deadline).
    bank_stall_s: float = 0.5
    # false sends every bank call straight through (for measuring what the butler saves).
    butler_enabled: bool = True
    # Wait before asking the bank about an unclear result (`--resolve-delay-s`).
    resolve_delay_s: float = 5.0
    resolver_max_backoff_s: float = 60.0
    # Storage.
    durability: str = "strict"  # or "relaxed": no fsync per commit
    map_size_mb: int = 1024
    max_readers: int = 1024
    writer_max_batch: int = 2048
    writer_max_wait_ms: float = 0.0
    writer_queue_limit: int = 100_000
    gate_max_envelopes: int = 50_000  # ~250 B each once sold out, 16 B a share until then
    # Bus: the credit consumer applies grabbed money to wallets.
    credit_batch: int = 1024
    credit_rate_per_s: float = 100_000.0  # 0 pauses crediting
    expiry_sweep_s: float = 1.0
    # Server.
    batch_grab_max_items: int = 1000
    max_concurrent_rpcs: int = 10_000
    grace_s: float = 5.0
    # The worker's event loop: "uvloop" (measured faster with grpc.aio) or "asyncio".
    event_loop: str = "uvloop"
    switch_interval_ms: float = 0.5
    access_log: bool = True
    # Echoing x-request-id sends initial metadata early: one more batch per
    # call (about 0.1 ms on loopback), so it is off unless asked for.
    echo_request_id: bool = False
    # Automatic QoS: admission control (gateway.qos.controller; DAGOR defaults).
    qos_enabled: bool = True
    qos_delay_threshold_ms: float = 20.0  # mean queuing delay that counts as overload
    qos_window_s: float = 1.0
    qos_window_requests: int = 2000
    qos_shed_step: float = 0.05  # of a window's requests shed more per overloaded window
    qos_admit_step: float = 0.01  # of a window's requests admitted more per calm window
    qos_p0_user_floor: int = 64  # P0 user priorities (of 128) never shed
    qos_loop_lag_ms: float = 50.0  # event-loop lag that counts as overload
    qos_loop_busy: float = 0.85  # busy share (GIL or process CPU) that counts as saturation
    qos_writer_depth: int = 5_000  # writer queue depth that counts as overload
    qos_bank_error_rate: float = 0.5  # a bank's error rate that counts as trouble
    qos_retry_pushback_ms: int = 1_000  # grpc-retry-pushback-ms on a shed call
    qos_pin_level: int = -1  # >= 0 pins the admission level (drills and tests)
    # method -> "P0".."P3" or "exempt" ([tiers] in TOML; gateway.qos.tiers).
    tiers: dict = dataclasses.field(default_factory=dict)
    # Degradations (each one a setting; gateway.qos.pressure says when they apply).
    # One user's SendEnvelope, GrabEnvelope, TopUp, Withdraw and UnlockPhoto calls per
    # second per worker, and the burst above it (gateway/qos/userlimit.py); 0 = no limit.
    user_rate_per_s: float = 50.0
    user_burst: int = 100
    balance_rate_per_s: float = 5_000.0  # GetBalance per worker; past it, the cache; 0 = no limit
    balance_cache_size: int = 100_000  # users whose last balance is kept (LRU)
    list_budget_ms: float = 50.0  # ListTransactions reads longer than this use the cache
    list_cache_size: int = 20_000  # users whose last first page is kept (LRU)
    noncore_floor_share: float = 0.1  # non-core consumers' rate under pressure (of nominal)
    # The credit consumer's rate while the writer is the bottleneck.
    credit_floor_rate_per_s: float = 1_000.0
    unlock_fen: int = 100  # what a Moments photo unlock costs the viewer
    unlock_free_step: float = 0.25  # share of unlocks turned free per pressured window
    # Bound cards (WalletService/BindCard): at most this many a user; the bound lists are
    # quasi-static, cached per worker (LRU of this many users, each entry trusted this long).
    max_bound_cards: int = 10
    cards_cache_size: int = 100_000
    cards_cache_ttl_s: float = 1.0

    def capacities(self) -> dict[str, float]:
        return {b: float(self.bank_capacity_tps.get(b, self.default_bank_capacity_tps))
                for b in self.banks}

    def validate(self) -> Settings:
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ValueError("event_loop must be 'uvloop' or 'asyncio'")
        if self.durability not in ("strict", "relaxed"):
            raise ValueError("durability must be 'strict' or 'relaxed'")
        if not 1 <= self.max_count <= 65_535:
            raise ValueError("max_count must be in 1..65535")
        if not 1 <= self.max_share_fen <= 2**31 - 1:
            raise ValueError("max_share_fen must fit in int32")
        unknown_banks = set(self.bank_capacity_tps) - set(self.banks)
        if unknown_banks:
            raise ValueError(f"bank_capacity_tps names unknown banks: {sorted(unknown_banks)}")
        if any(not c > 0 for c in self.capacities().values()):
            raise ValueError("bank capacities must be > 0 calls/s")
        self._validate_channels()
        if self.writer_max_batch < 1 or self.writer_queue_limit < self.writer_max_batch:
            raise ValueError("writer_queue_limit must be >= writer_max_batch >= 1")
        self._validate_qos()
        return self

    def _validate_channels(self) -> None:
        if not 0 < self.bank_stall_s <= 60:
            raise ValueError("bank_stall_s must be in (0, 60]")
        known = ("direct", "clearing")
        chans = self.bank_channels
        if not chans or len(set(chans)) != len(chans) or set(chans) - set(known):
            raise ValueError(f"bank_channels must be distinct names of {', '.join(known)}")
        unknown = set(self.channel_capacity_tps) - set(chans)
        if unknown:
            raise ValueError(f"channel_capacity_tps names unknown channels: {sorted(unknown)}")
        if any(not (isinstance(c, int | float) and c > 0)
               for c in self.channel_capacity_tps.values()):
            raise ValueError("channel capacities must be > 0 calls/s")

    def _validate_qos(self) -> None:
        self.tiers = {str(k): str(v) for k, v in self.tiers.items()}
        tier_table(self.tiers)  # its own check names a bad entry
        if not self.qos_delay_threshold_ms > 0 or not self.qos_window_s > 0:
            raise ValueError("qos_delay_threshold_ms and qos_window_s must be > 0")
        if not 0 < self.qos_loop_busy <= 1:
            raise ValueError("qos_loop_busy must be in (0, 1]")
        if not 1 <= self.qos_p0_user_floor <= 128:
            raise ValueError("qos_p0_user_floor must be in 1..128")
        if self.qos_pin_level >= 4 * 128:
            raise ValueError("qos_pin_level must be < 512 (or -1 for automatic)")
        if self.user_rate_per_s < 0 or self.user_burst < 0:
            raise ValueError("user_rate_per_s and user_burst must be >= 0")
        if min(self.balance_rate_per_s, self.balance_cache_size, self.list_cache_size,
               self.list_budget_ms, self.credit_floor_rate_per_s) < 0:
            raise ValueError("balance_rate_per_s, list_budget_ms, credit_floor_rate_per_s "
                             "and the cache sizes must be >= 0")
        if not 0 < self.noncore_floor_share <= 1 or not 0 < self.unlock_free_step <= 1:
            raise ValueError("noncore_floor_share and unlock_free_step must be in (0, 1]")
        if not 1 <= self.unlock_fen <= self.max_share_fen:
            raise ValueError("unlock_fen must be in 1..max_share_fen")

    def controller_options(self) -> ControllerOptions:
        return ControllerOptions(
            delay_threshold_ms=self.qos_delay_threshold_ms, window_s=self.qos_window_s,
            window_requests=self.qos_window_requests, shed_step=self.qos_shed_step,
            admit_step=self.qos_admit_step, p0_user_floor=self.qos_p0_user_floor).validate()

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> Settings:
        values: dict = {}
        if path:
            with open(path, "rb") as f:
                values = tomllib.load(f)
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown settings in {path}: {sorted(unknown)}")
            if "banks" in values:
                values["banks"] = tuple(values["banks"])
            if "bank_channels" in values:
                values["bank_channels"] = tuple(values["bank_channels"])
            _check_types(path, values)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()


def _check_types(path: str | Path, values: dict) -> None:
    """Each value from a file has its field's type (an int may stand for a float)."""
    defaults = Settings()
    for name, value in values.items():
        want = type(getattr(defaults, name))
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ValueError(f"{path}: {name} must be {want.__name__}, "
                             f"not {type(value).__name__} ({value!r})")
