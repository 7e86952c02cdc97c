"""Start-up mistakes on `hongbao serve` are one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys

from gateway.security import tickets


def _refused(*flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "serve", "--port", "0",
                           *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("hongbao serve: ")
    return line


def test_unknown_or_mistyped_setting(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text("no_such_setting = 1\n")
    assert "no_such_setting" in _refused("--data-dir", str(tmp_path / "d"), "--config", str(cfg))
    cfg.write_text('max_count = "many"\n')
    assert "max_count" in _refused("--data-dir", str(tmp_path / "d"), "--config", str(cfg))
    cfg.write_text("max_count = [\n")
    _refused("--data-dir", str(tmp_path / "d"), "--config", str(cfg))   # not TOML at all


def test_bad_log_level_and_workers(tmp_path):
    assert "loud" in _refused("--data-dir", str(tmp_path / "d"), "--log-level", "loud")
    assert "--workers" in _refused("--data-dir", str(tmp_path / "d"), "--workers", "0")


def test_key_file_readable_by_others_or_missing(tmp_path):
    tickets.KeyRing.load_or_create(tmp_path / "keys")
    key_file = next((tmp_path / "keys").glob("*key*"))
    key_file.chmod(0o640)
    line = _refused("--data-dir", str(tmp_path / "d"), "--key-file", str(key_file))
    assert "chmod 600" in line
    assert "does not exist" in _refused("--data-dir", str(tmp_path / "d"), "--key-file",
                                        str(tmp_path / "nope.json"))


def _ledger_with_pages(data_dir) -> None:
    import asyncio

    from gateway.domain import keys
    from gateway.ledger import LmdbLedger
    led = LmdbLedger(data_dir)

    def fill(b) -> None:
        for i in range(20_000):
            b.tx.put(keys.META, b"filler-%d" % i, b"v" * 50)
    asyncio.run(led.write(fill))
    led.close()


def test_a_damaged_or_truncated_ledger_is_never_served(tmp_path):
    """Not LMDB, overwritten, or cut short: serve and reconcile refuse in one line, exit 2."""
    _ledger_with_pages(tmp_path / "ok")
    data = tmp_path / "ok" / "ledger" / "data.mdb"
    for name, damage in (("garbage", lambda b: b"\xff" * 8192 + b[8192:]),
                         ("cut", lambda b: b[: len(b) // 3]),
                         ("empty", lambda b: b"")):
        bad = tmp_path / name / "ledger"
        bad.mkdir(parents=True)
        (bad / "data.mdb").write_bytes(damage(data.read_bytes()))
        line = _refused("--data-dir", str(tmp_path / name))
        assert "ledger" in line and ("cannot be opened" in line or "truncated" in line), line
        done = subprocess.run([sys.executable, "-m", "gateway.ops.cli", "reconcile",
                               "--data-dir", str(tmp_path / name)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


def test_a_ledger_still_being_created_is_not_taken_for_a_damaged_one(tmp_path):
    """A data.mdb another process has created but not yet given its tables (the first start
    of --workers 2 used to die on it): the check passes and the gateway starts."""
    ledger = tmp_path / "fresh" / "ledger"
    ledger.mkdir(parents=True)
    # An LMDB environment with no tables yet, made by another process as a worker would.
    subprocess.run([sys.executable, "-c", f"import lmdb; lmdb.open({str(ledger)!r}).close()"],
                   check=True, timeout=60)
    from gateway.ledger import check_ledger
    check_ledger(tmp_path / "fresh")
    from gateway.ops.procs import gateway_proc
    gw = gateway_proc(tmp_path / "fresh", "--workers", "2", log_path=tmp_path / "gw.log")
    try:
        gw.start()
    finally:
        gw.stop()
