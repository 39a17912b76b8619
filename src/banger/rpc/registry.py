"""Method registry: `<area>.<verb>` names mapped to async handlers, with parameter checking."""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from banger.errors import ErrorCode

Handler = Callable[..., Awaitable[Any]]


class ParamsError(Exception):
    """Unknown method or bad parameters; carries the JSON-RPC error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    signature: inspect.Signature
    hints: dict[str, Any]
    doc: str


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is not None:
        hint = origin
    if hint is float:  # JSON has no inf/NaN, but Python's json module accepts them: refuse them here
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


class MethodRegistry:
    """Holds the daemon's RPC surface; handlers take (ctx, **params) with annotated params."""

    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def add(self, name: str, handler: Handler) -> None:
        if name in self.methods:
            raise ValueError(f"method {name} registered twice")
        sig = inspect.signature(handler)
        hints = typing.get_type_hints(handler)
        doc = (inspect.getdoc(handler) or "").splitlines()[0] if handler.__doc__ else ""
        self.methods[name] = Method(name, handler, sig, hints, doc)

    def method(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator form of add()."""

        def deco(fn: Handler) -> Handler:
            self.add(name, fn)
            return fn

        return deco

    async def call(self, name: str, ctx: Any, params: dict[str, Any]) -> Any:
        """Check params against the handler's signature and annotations, then await it."""
        m = self.methods.get(name)
        if m is None:
            raise ParamsError(ErrorCode.METHOD_NOT_FOUND, f"unknown method {name!r}")
        try:
            bound = m.signature.bind(ctx, **params)
        except TypeError as exc:
            raise ParamsError(ErrorCode.INVALID_PARAMS, f"bad params for {name}: {exc}") from exc
        for pname, value in bound.arguments.items():
            hint = m.hints.get(pname)
            if pname == "ctx" or hint is None:
                continue
            if not _type_ok(value, hint):
                raise ParamsError(
                    ErrorCode.INVALID_PARAMS,
                    f"bad params for {name}: {pname!r} must be {_type_name(hint)}, got {type(value).__name__}",
                )
        return await m.handler(*bound.args, **bound.kwargs)
