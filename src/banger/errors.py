"""One exception root for banger; every subclass carries a user-facing message and an RPC code."""

from __future__ import annotations

from enum import IntEnum

TYPE_CHECKING = False  # every CLI path imports this module, the fast ones included: typing stays out at run time
if TYPE_CHECKING:
    from typing import Any


class ErrorCode(IntEnum):
    """RPC error codes: JSON-RPC's reserved ones plus banger's application range."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL = -32603
    GENERIC = 1
    NOT_FOUND = 2
    ALREADY_EXISTS = 3
    IN_USE = 4
    INVALID_INPUT = 5
    CANCELLED = 6
    VERSION_MISMATCH = 7
    DOWNLOAD = 8
    UNSAFE_ARCHIVE = 9
    INTEGRITY = 10
    TOOL_FAILED = 11
    DAEMON = 12
    UNSUPPORTED = 13
    TIMEOUT = 14
    BUSY = 15
    PERMISSION_DENIED = 16


class BangerError(Exception):
    """Root of banger's errors: `message` is shown to the user as `error: <message>`."""

    code: ErrorCode = ErrorCode.GENERIC

    def __init__(self, message: str, *, hint: str | None = None, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.data = data or {}

    def __str__(self) -> str:
        return self.message


class NotFoundError(BangerError):
    code = ErrorCode.NOT_FOUND


class AlreadyExistsError(BangerError):
    code = ErrorCode.ALREADY_EXISTS


class InUseError(BangerError):
    code = ErrorCode.IN_USE


class InvalidInputError(BangerError):
    code = ErrorCode.INVALID_INPUT


class CancelledError(BangerError):
    code = ErrorCode.CANCELLED


class VersionMismatchError(BangerError):
    code = ErrorCode.VERSION_MISMATCH


class DownloadError(BangerError):
    code = ErrorCode.DOWNLOAD


class UnsafeArchiveError(BangerError):
    code = ErrorCode.UNSAFE_ARCHIVE


class IntegrityError(BangerError):
    code = ErrorCode.INTEGRITY


class ToolError(BangerError):
    """An external tool failed; the message includes the tool's own words."""

    code = ErrorCode.TOOL_FAILED


class DaemonError(BangerError):
    code = ErrorCode.DAEMON


class UnsupportedError(BangerError):
    code = ErrorCode.UNSUPPORTED


class TimeoutError_(BangerError):
    code = ErrorCode.TIMEOUT


class BusyError(BangerError):
    code = ErrorCode.BUSY


class PermissionDeniedError(BangerError):
    """The caller may not do this (not in the daemon's group, someone else's VM, a root-only operation)."""

    code = ErrorCode.PERMISSION_DENIED


class ConfigError(InvalidInputError):
    pass


class RpcError(BangerError):
    """An error received from the daemon, rebuilt on the client side."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message, data=data)
        self.rpc_code = code


_BY_CODE: dict[int, type[BangerError]] = {
    cls.code: cls
    for cls in (
        NotFoundError,
        AlreadyExistsError,
        InUseError,
        InvalidInputError,
        CancelledError,
        VersionMismatchError,
        DownloadError,
        UnsafeArchiveError,
        IntegrityError,
        ToolError,
        DaemonError,
        UnsupportedError,
        TimeoutError_,
        BusyError,
        PermissionDeniedError,
    )
}


def error_class_for(code: int) -> type[BangerError]:
    """The BangerError subclass that a given RPC error code stands for."""
    return _BY_CODE.get(code, BangerError)
