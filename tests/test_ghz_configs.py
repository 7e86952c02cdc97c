"""The ghz configs in bench/ghz/, filled against a real gateway, mean what they say.

ghz itself is in no registry here (tests/test_reflection.py runs it when GHZ is set), so
this replays each filled config the way ghz reads it: ``data`` and ``metadata`` taken
round-robin, one step per call, ``{{.RequestNumber}}`` the call's number, the JSON
parsed into the method's request message by protobuf's own JSON rules.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from gateway.client import Client
from hongbao.v1 import envelope_pb2, wallet_pb2

ROOT = Path(__file__).resolve().parents[1]


def _bench_ghz():
    spec = importlib.util.spec_from_file_location("bench_ghz", ROOT / "bench" / "bench_ghz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ghz"] = module
    spec.loader.exec_module(module)
    return module


REQUESTS = {
    "hongbao.v1.EnvelopeService/GrabEnvelope": envelope_pb2.GrabEnvelopeRequest,
    "hongbao.v1.EnvelopeService/SendEnvelope": envelope_pb2.SendEnvelopeRequest,
    "hongbao.v1.WalletService/GetBalance": wallet_pb2.GetBalanceRequest,
}


def _calls(config: dict, n: int):
    """(request, metadata) of ghz's first ``n`` calls of ``config``."""
    data = config["data"] if isinstance(config["data"], list) else [config["data"]]
    metadata = config["metadata"]
    for i in range(n):
        text = json.dumps(data[i % len(data)]).replace("{{.RequestNumber}}", str(i))
        request = json_format.Parse(text, REQUESTS[config["call"]]())
        yield request, tuple(metadata[i % len(metadata)].items())


def test_filled_ghz_configs_make_real_grabs_sends_and_reads(stack, tmp_path):
    bench = _bench_ghz()
    paths = bench.prepare(stack.target, stack.data_dir, tmp_path / "configs", senders=2,
                          envelopes=3, shares=5, grabbers=4)
    configs = {name: json.loads(p.read_text()) for name, p in paths.items()}
    assert set(configs) == {"grab", "send", "balance"}
    assert all(c["host"] == stack.target and c["insecure"] for c in configs.values())
    grab = configs["grab"]
    # 4 grabbers become 5 (coprime with 3 envelopes): 15 distinct pairs, 15 shares.
    assert (len(grab["data"]), len(grab["metadata"]), grab["total"]) == (3, 5, 15)

    async def replay():
        async with Client(stack.target) as c:
            outcomes = [(await c.envelopes.GrabEnvelope(r, metadata=m)).outcome
                        for r, m in _calls(grab, grab["total"])]
            assert outcomes == [envelope_pb2.GRAB_OUTCOME_GRABBED] * 15
            again = [(await c.envelopes.GrabEnvelope(r, metadata=m)).outcome
                     for r, m in list(_calls(grab, grab["total"] + 1))[-1:]]
            # Call 16 pairs user 0 with envelope 0 again, under a new request id.
            assert again == [envelope_pb2.GRAB_OUTCOME_ALREADY_GRABBED]
            sent = [await c.envelopes.SendEnvelope(r, metadata=m)
                    for r, m in _calls(configs["send"], 4)]
            assert len({s.envelope_id for s in sent}) == 4
            assert all(s.paid_via == envelope_pb2.PAY_METHOD_BALANCE for s in sent)
            for r, m in _calls(configs["balance"], len(configs["balance"]["metadata"])):
                await c.wallet.GetBalance(r, metadata=m)
            with pytest.raises(grpc.aio.AioRpcError) as denied:   # no ticket, no answer
                await c.wallet.GetBalance(wallet_pb2.GetBalanceRequest())
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    asyncio.run(replay())
    assert paths["grab"].stat().st_mode & 0o777 == 0o600   # tickets inside


def test_bench_ghz_without_ghz_says_why(monkeypatch, capsys):
    monkeypatch.delenv("GHZ", raising=False)
    result = _bench_ghz().main([])
    assert result["skipped"].startswith("skipped: ghz is in no package registry")
    assert "GHZ=/path/to/ghz" in capsys.readouterr().out
