"""Creating a replicated stream while the cluster still places its peers is retried."""

import pytest
from nats import errors as nats_errors
from nats.js import errors as js_errors

from gateway.cluster.forming import placed
from tests.conftest import run


def _failing(times: int, exc: Exception):
    calls = []

    async def call():
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return len(calls)
    return call, calls


def test_no_suitable_peers_is_retried_until_placed():
    call, calls = _failing(2, js_errors.BadRequestError(
        code=400, err_code=10005, description="no suitable peers for placement"))
    assert run(placed(call, timeout_s=5)) == 3 and len(calls) == 3


def test_another_bad_request_is_raised_at_once():
    call, calls = _failing(5, js_errors.BadRequestError(
        code=400, err_code=10058, description="stream name already in use"))
    with pytest.raises(js_errors.BadRequestError):
        run(placed(call, timeout_s=5))
    assert len(calls) == 1


def test_the_last_error_is_raised_at_the_deadline():
    call, calls = _failing(1000, js_errors.ServiceUnavailableError(code=503))
    with pytest.raises(js_errors.ServiceUnavailableError):
        run(placed(call, timeout_s=0.6))
    assert 2 <= len(calls) <= 5


def test_a_timed_out_request_is_retried_and_not_found_is_raised_at_once():
    call, calls = _failing(2, nats_errors.TimeoutError())
    assert run(placed(call, timeout_s=5)) == 3 and len(calls) == 3
    call, calls = _failing(5, js_errors.NotFoundError(code=404))
    with pytest.raises(js_errors.NotFoundError):
        run(placed(call, timeout_s=5))
    assert len(calls) == 1
