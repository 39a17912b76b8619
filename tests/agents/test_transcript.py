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
