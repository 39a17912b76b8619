"""A STAND-IN for a model provider: a tiny OpenAI-compatible server on loopback (the model is the one component
that cannot run here). POST /v1/chat/completions answers with streamed chunks (server-sent events); when the
conversation has no tool result yet and `tool_call` is set, the answer is that tool call, else `text`. A prompt
(the newest user message) that holds SLOW_MARK is answered only after SLOW_S seconds (for tests that abort a turn),
one that holds PAUSE_MARK after PAUSE_S (a turn that is surely still in flight a few seconds after it starts).
It records every request (path, headers, JSON body) so tests can check what reached the provider."""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A prompt holding this mark gets its answer only after SLOW_S seconds.
SLOW_MARK = "[slow]"
SLOW_S = 600.0
# A prompt holding this mark gets its answer after PAUSE_S seconds.
PAUSE_MARK = "[pause]"
PAUSE_S = 10.0


def _last_user_text(payload: dict[str, Any]) -> str:
    """The newest user message's text (the prompt this request answers; older ones stay in the history)."""
    for message in reversed(payload.get("messages") or []):
        if message.get("role") == "user":
            return json.dumps(message.get("content"))
    return ""


@dataclass
class StandinModel:
    text: str = "done."
    tool_call: tuple[str, dict[str, Any]] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self, host: str = "127.0.0.1") -> int:
        self.server = await asyncio.start_server(self._serve, host, 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    record: Path | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            payload = json.loads(body) if body else {}
            self.requests.append({"method": method, "path": path, "headers": headers, "body": payload})
            if self.record is not None:
                self.record.write_text(json.dumps(self.requests))
            if not path.endswith("/chat/completions"):
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            if _last_user_text(payload).find(SLOW_MARK) >= 0:
                await writer.drain()
                await asyncio.sleep(SLOW_S)  # a turn that takes its time, for tests that abort one
            elif _last_user_text(payload).find(PAUSE_MARK) >= 0:
                await writer.drain()
                await asyncio.sleep(PAUSE_S)
            for chunk in self._chunks(payload):
                writer.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await writer.drain()
                await asyncio.sleep(0.05)  # really streamed, in pieces
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        finally:
            writer.close()

    def _chunks(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        model = payload.get("model", "standin")
        had_tool = any(m.get("role") == "tool" for m in payload.get("messages", []))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-standin",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        offered = {(t.get("function") or {}).get("name") for t in payload.get("tools") or []}
        if self.tool_call is not None and not had_tool and self.tool_call[0] in offered:
            name, args = self.tool_call
            call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}
            text = json.dumps(args)
            out = [chunk({"role": "assistant", "tool_calls": [call]})]
            for i in range(0, len(text), 16):
                out.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": text[i : i + 16]}}]}))
            return [*out, chunk({}, "tool_calls")]
        words = self.text.split(" ")
        out = [chunk({"role": "assistant", "content": ""})]
        out += [chunk({"content": w + (" " if i < len(words) - 1 else "")}) for i, w in enumerate(words)]
        return [*out, chunk({}, "stop")]


def main() -> None:
    """Run the stand-in in the foreground (tests start it inside a network namespace)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--text", default="done.")
    parser.add_argument("--tool", default=None, help="tool name to call first")
    parser.add_argument("--args", default="{}", help="that tool's arguments, as JSON")
    parser.add_argument("--record", type=Path, default=None, help="write the requests seen to this file")
    opts = parser.parse_args()

    async def serve() -> None:
        model = StandinModel(text=opts.text, record=opts.record)
        if opts.tool:
            model.tool_call = (opts.tool, json.loads(opts.args))
        server = await asyncio.start_server(model._serve, "127.0.0.1", opts.port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
