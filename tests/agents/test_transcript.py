"""Transcript events from opencode's messages (shapes as its GET /session/:id/message returns them)."""

from __future__ import annotations

from banger.agents.conversations import render, transcript
from banger.agents.service import opencode_env

MESSAGES = [
    {"info": {"role": "user", "time": {"created": 1}}, "parts": [{"type": "text", "text": "write hello.txt"}]},
    {
        "info": {"role": "assistant", "time": {"created": 2, "completed": 5}},
        "parts": [
            {"type": "step-start"},
            {"type": "tool", "tool": "write", "state": {"status": "completed", "title": "hello.txt"}},
            {"type": "text", "text": "Done.", "time": {"start": 4}},
        ],
    },
    {
        "info": {
            "role": "assistant",
            "time": {"created": 6},
            "error": {"name": "APIError", "data": {"message": "boom"}},
        },
        "parts": [{"type": "tool", "tool": "bash", "state": {"status": "error", "error": "exit 1"}}],
    },
]


def test_transcript_events_and_lines() -> None:
    events = transcript(MESSAGES)
    assert [e["type"] for e in events] == ["text", "tool", "text", "tool", "error"]
    assert all("time" in e for e in events)
    lines = [render(e) for e in events]
    assert lines == [
        "user: write hello.txt",
        "[tool write: completed] hello.txt",
        "assistant: Done.",
        "[tool bash: error] (exit 1)",
        "[error] boom",
    ]
    assert render({"type": "idle", "time": 9}) == "[idle]"


def test_opencode_env_names_the_proxy_not_the_key() -> None:
    env = opencode_env("pw", "http://172.30.77.1:4000/tok", "qwen")
    assert env["OPENCODE_SERVER_PASSWORD"] == "pw"
    for flag in ("AUTOUPDATE", "MODELS_FETCH", "LSP_DOWNLOAD", "DEFAULT_PLUGINS"):
        assert env[f"OPENCODE_DISABLE_{flag}"] == "1"
    import json

    config = json.loads(env["OPENCODE_CONFIG_CONTENT"])
    assert config["permission"] == "allow" and config["model"] == "banger/qwen"
    provider = config["provider"]["banger"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"] == {"baseURL": "http://172.30.77.1:4000/tok"}
    assert "provider" not in json.loads(opencode_env("pw")["OPENCODE_CONFIG_CONTENT"])


def test_renderer_streams_text_as_it_grows_and_tools_as_their_status_changes() -> None:
    from banger.agents.conversations import Renderer

    r = Renderer()
    tool = {"type": "tool", "time": 2, "tool": "write", "status": "running"}
    steps = [
        [{"type": "text", "time": 1, "role": "assistant", "text": "Wri"}],
        [{"type": "text", "time": 1, "role": "assistant", "text": "Writing it"}],
        [{"type": "text", "time": 1, "role": "assistant", "text": "Writing it."}, tool],
        [{"type": "text", "time": 1, "role": "assistant", "text": "Writing it."}, tool],  # nothing new
        [{"type": "text", "time": 1, "role": "assistant", "text": "Writing it."}, {**tool, "status": "completed"}],
    ]
    chunks = [r.feed(step) for step in steps]
    assert chunks[0] == ["assistant: ", "Wri"] and chunks[1] == ["ting it"] and chunks[3] == []
    final = [*steps[-1], {"type": "text", "time": 3, "role": "assistant", "text": "Done."}, {"type": "idle", "time": 4}]
    chunks.append(r.feed(final, final=True))
    assert "".join(c for step in chunks for c in step) == (
        "assistant: Writing it.\n[tool write: running]\n[tool write: completed]\nassistant: Done.\n[idle]\n"
    )


def test_a_turn_streams_to_late_watchers_from_its_start_and_ends_them() -> None:
    import asyncio

    from banger.agents.conversations import FELL_BEHIND, WATCHER_BACKLOG, Turn

    async def main() -> None:
        turn = Turn()
        turn.task = asyncio.get_running_loop().create_future()  # type: ignore[assignment]  # a turn in flight
        turn.publish("assistant: hel")
        late = turn.watch()
        turn.publish("lo\n")
        assert [await late.get(), await late.get()] == ["assistant: hel", "lo\n"]  # from the turn's start
        slow = turn.watch()
        for _ in range(WATCHER_BACKLOG + 1):  # nobody reads `slow`: it is ended, not buffered for
            turn.publish("")
        assert slow not in turn.watchers and late not in turn.watchers
        turn.task.set_result({})  # type: ignore[union-attr]
        turn.finish()
        for watcher in (late, slow):  # each ended with a note, never left waiting
            assert [await watcher.get(), await watcher.get()] == [FELL_BEHIND, None]
        done = turn.watch()  # after the end: what it said, then the end
        assert [await done.get(), await done.get()] == ["assistant: hello\n", None]

    asyncio.run(main())


def test_a_turns_event_feed_is_separate_and_events_are_final_once_superseded() -> None:
    import asyncio

    from banger.agents.conversations import Turn, _final

    running = {"type": "tool", "time": 2, "tool": "write", "status": "running"}
    text = {"type": "text", "time": 1, "role": "assistant", "text": "Writing"}
    assert not _final(text, newest=True)  # may still grow
    assert _final(text, newest=False)
    assert not _final(running, newest=False)  # its status can still change
    assert _final({**running, "status": "completed"}, newest=False)
    assert _final({**running, "status": "error"}, newest=False)

    async def main() -> None:
        turn = Turn()
        turn.task = asyncio.get_running_loop().create_future()  # type: ignore[assignment]  # a turn in flight
        words, events = turn.watch(), turn.watch(Turn.EVENTS)
        turn.publish("assistant: hi")
        turn.publish('{"type": "text"}\n', Turn.EVENTS)
        late = turn.watch(Turn.EVENTS)  # from the turn's start, events only
        turn.task.set_result({})  # type: ignore[union-attr]
        turn.finish()
        assert [await words.get(), await words.get(), await words.get()] == ["", "assistant: hi", None]
        assert [await events.get(), await events.get(), await events.get()] == ["", '{"type": "text"}\n', None]
        assert [await late.get(), await late.get()] == ['{"type": "text"}\n', None]

    asyncio.run(main())
