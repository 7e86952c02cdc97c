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
