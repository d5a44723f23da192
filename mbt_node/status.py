"""A request refusal with its gRPC status code, raised below the servicer, aborted at it."""

from __future__ import annotations

import grpc


class StatusError(Exception):
    def __init__(
        self, code: grpc.StatusCode, details: str, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.metadata = metadata
