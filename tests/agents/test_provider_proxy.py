"""The credential-adding proxy between an agent VM and its model provider, against a stand-in provider (see
standin_model.py): real HTTP on loopback both sides."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from banger.agents.provider import CredentialProxy, Provider
from banger.errors import InvalidInputError

from .standin_model import StandinModel


def test_proxy_adds_the_key_streams_and_refuses_without_the_token() -> None:
    async def main() -> None:
        model = StandinModel(text="hello from the stand-in model")
        port = await model.start()
        proxy = CredentialProxy(Provider(f"http://127.0.0.1:{port}/v1", "standin", "sk-secret-key"))
        host, pport = await proxy.start("127.0.0.1")
        base = proxy.url_for(host, pport)
        assert "sk-secret-key" not in base
        try:
            async with httpx.AsyncClient() as client:
                body = {"model": "standin", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                pieces = []
                async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
                assert "".join(pieces) == "hello from the stand-in model"
                seen = model.requests[-1]
                assert seen["path"] == "/v1/chat/completions"
                assert seen["headers"]["authorization"] == "Bearer sk-secret-key"
                assert seen["body"]["messages"][0]["content"] == "hi"
                bad = await client.post(f"http://{host}:{pport}/v1/chat/completions", json=body)
                assert bad.status_code == 403 and len(model.requests) == 1
                sneaky = await client.post(f"{base}x/chat/completions", json=body)  # a token prefix is no token
                assert sneaky.status_code == 403
        finally:
            await proxy.close()
            await model.close()

    asyncio.run(main())


def test_provider_params() -> None:
    assert Provider.from_params(None) is None and Provider.from_params({"base_url": ""}) is None
    p = Provider.from_params({"base_url": "http://127.0.0.1:8000/v1/", "model": "m", "api_key": "sekrit"})
    assert p is not None and (p.base_url, p.model, p.api_key) == ("http://127.0.0.1:8000/v1", "m", "sekrit")
    assert "sekrit" not in repr(p)
    with pytest.raises(InvalidInputError, match="http"):
        Provider.from_params({"base_url": "file:///etc/passwd", "model": "m"})
    with pytest.raises(InvalidInputError, match="model"):
        Provider.from_params({"base_url": "http://x/v1"})
