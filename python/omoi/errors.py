"""Errors: every failed reply of the control plane becomes an :class:`OmoiError`.

A failed reply carries ``{"error": {"code", "message", "field"?}}`` and the NATS service
headers ``Nats-Service-Error`` and ``Nats-Service-Error-Code`` (an HTTP-like status). The
``code`` is the stable, machine-readable part: branch on it (or on the subclass), never on
the message text::

    try:
        await registry.register("worker-1", ["python"])
    except ConflictError:
        ...                                  # the name is held by a live agent
    except OmoiError as e:
        if e.code == "validation":
            print("fix", e.field)
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = [
    "OmoiError",
    "ValidationError",
    "MalformedError",
    "UnauthorizedError",
    "ForbiddenError",
    "NotFoundError",
    "UnknownAgentError",
    "ConflictError",
    "DeregisteredError",
    "TooLargeError",
    "InternalError",
    "UnavailableError",
    "NoResponderError",
    "RequestTimeoutError",
    "BadReplyError",
    "LockError",
    "error_for",
]


class OmoiError(Exception):
    """A request omoi refused or could not answer.

    ``code`` is the error code of the reply (``validation``, ``malformed``, ``forbidden``,
    ``not_found``, ``unknown_agent``, ``conflict``, ``deregistered``, ``too_large``,
    ``internal``, ``unavailable``; and, raised by this SDK without a reply: ``no_responders``,
    ``timeout``, ``bad_reply``, ``lock``). ``status`` is the HTTP-like status of
    ``Nats-Service-Error-Code`` (``None`` when there was no reply). ``field`` names the
    offending field of a validation error.
    """

    code: str = "error"
    status: int | None = None

    def __init__(
        self,
        code: str | None = None,
        message: str = "",
        field: str | None = None,
        status: int | None = None,
        *,
        subject: str | None = None,
    ) -> None:
        self.code = code if code is not None else type(self).code
        self.message = message
        self.field = field
        self.status = status if status is not None else type(self).status
        self.subject = subject
        super().__init__(message)

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.code}: {self.message}{where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"field={self.field!r}, status={self.status!r})"
        )


class ValidationError(OmoiError):
    """400 ``validation``: a field is wrong; ``field`` names it."""

    code = "validation"
    status = 400


class MalformedError(OmoiError):
    """400 ``malformed``: the request could not be read."""

    code = "malformed"
    status = 400


class UnauthorizedError(OmoiError):
    code = "unauthorized"
    status = 401


class ForbiddenError(OmoiError):
    """403 ``forbidden``: the acting agent may not do this (e.g. act as another agent)."""

    code = "forbidden"
    status = 403


class NotFoundError(OmoiError):
    code = "not_found"
    status = 404


class UnknownAgentError(OmoiError):
    """404 ``unknown_agent``: the agent is not registered (register it again)."""

    code = "unknown_agent"
    status = 404


class ConflictError(OmoiError):
    """409 ``conflict``: a live agent holds the name, an illegal status change, a decided
    handoff…"""

    code = "conflict"
    status = 409


class DeregisteredError(OmoiError):
    """410 ``deregistered``: an operator deregistered the agent; stop hosting it."""

    code = "deregistered"
    status = 410


class TooLargeError(OmoiError):
    code = "too_large"
    status = 413


class InternalError(OmoiError):
    code = "internal"
    status = 500


class UnavailableError(OmoiError):
    """503 ``unavailable``: overloaded, or the database or NATS is down: try again."""

    code = "unavailable"
    status = 503


class NoResponderError(OmoiError):
    """Nobody answers the subject: no control plane runs (or, on a server with
    permissions, the sender may not publish there)."""

    code = "no_responders"


class RequestTimeoutError(OmoiError):
    """No reply within the request's timeout."""

    code = "timeout"


class BadReplyError(OmoiError):
    """A reply that is not the JSON it should be."""

    code = "bad_reply"


class LockError(OmoiError):
    """The lock store failed, or a held lock was lost (its fencing token is stale)."""

    code = "lock"


_BY_CODE: dict[str, type[OmoiError]] = {
    cls.code: cls
    for cls in (
        ValidationError,
        MalformedError,
        UnauthorizedError,
        ForbiddenError,
        NotFoundError,
        UnknownAgentError,
        ConflictError,
        DeregisteredError,
        TooLargeError,
        InternalError,
        UnavailableError,
        NoResponderError,
        RequestTimeoutError,
        BadReplyError,
        LockError,
    )
}


def error_for(
    body: Mapping[str, Any],
    status: int | None = None,
    *,
    subject: str | None = None,
) -> OmoiError:
    """The exception for an error body ``{"code", "message", "field"?}``: the subclass of its
    code (an unknown code gives an :class:`InternalError` whose ``code`` is that code)."""
    code = str(body.get("code") or "error")
    message = str(body.get("message") or "")
    field = body.get("field")
    # A code this SDK does not know (from a newer control plane) is treated as `internal`;
    # `code` keeps what the reply said.
    cls = _BY_CODE.get(code, InternalError)
    return cls(
        code,
        message,
        field if isinstance(field, str) else None,
        status,
        subject=subject,
    )
