"""The node servicer's one table from domain errors to gRPC status codes and trailers."""

from __future__ import annotations

import grpc
import pytest

from mbt_core.errors import (
    CacheBehind,
    LimitExceeded,
    MbtError,
    NotSessionOwner,
    OutOfContext,
    SessionEnded,
    SessionRefused,
)
from mbt_core.wire.contract import CACHE_LENGTH_METADATA
from mbt_node.errors import BranchNotServed, InvalidRequest, NodeLoading
from mbt_node.servicer import _call_error, status_of


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NodeLoading(), grpc.StatusCode.UNAVAILABLE),
        (InvalidRequest("no branches requested"), grpc.StatusCode.INVALID_ARGUMENT),
        (BranchNotServed("layer 0 branch 3 is not served"), grpc.StatusCode.NOT_FOUND),
        (CacheBehind("cache holds 4", 4), grpc.StatusCode.FAILED_PRECONDITION),
        (SessionEnded("session was ended"), grpc.StatusCode.FAILED_PRECONDITION),
        (OutOfContext("past the window"), grpc.StatusCode.OUT_OF_RANGE),
        (LimitExceeded("quota full", "max-sessions"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NotSessionOwner("another caller's"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_each_refusal_has_its_code_and_message(error: MbtError, code: grpc.StatusCode) -> None:
    status = status_of(error)
    assert status.code == code
    assert status.details == str(error)
    assert _call_error(error).code == code.value[0]


def test_only_a_cache_behind_carries_the_cache_length() -> None:
    status = status_of(CacheBehind("cache holds 7", 7))
    assert status.trailers == ((CACHE_LENGTH_METADATA, "7"),)
    assert _call_error(CacheBehind("cache holds 7", 7)).cache_length == 7
    assert status_of(OutOfContext("past the window")).trailers == ()
    assert _call_error(OutOfContext("past the window")).cache_length == 0


def test_a_kind_not_in_the_table_takes_its_nearest_parent() -> None:
    class Paused(SessionRefused):
        pass

    class Stale(CacheBehind):
        pass

    assert status_of(Paused("paused")).code == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(Stale("stale", 2)).trailers == ((CACHE_LENGTH_METADATA, "2"),)
