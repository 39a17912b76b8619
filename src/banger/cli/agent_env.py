"""What the CLI sends about the agent VMs' model provider: config `[agent]` overlaid by its own environment."""

from __future__ import annotations

import os
from typing import Any

from banger.config import Paths, read_config_file

BASE_URL_ENV = "BANGER_AGENT_BASE_URL"
MODEL_ENV = "BANGER_AGENT_MODEL"
API_KEY_ENV = "BANGER_AGENT_API_KEY"


def provider_params() -> dict[str, Any] | None:
    """{base_url, model, api_key} from config.toml's [agent] and BANGER_AGENT_*; None when no provider is set.

    The key is read from BANGER_AGENT_API_KEY or the variable `api_key_env` names, in the CLI's environment (the
    daemon may have been started by someone else), and travels only in the call.
    """
    table: dict[str, Any] = read_config_file(Paths.from_env().config_file).get("agent") or {}
    base_url = os.environ.get(BASE_URL_ENV) or table.get("base_url")
    if not base_url:
        return None
    key_var = table.get("api_key_env")
    api_key = os.environ.get(API_KEY_ENV) or (os.environ.get(key_var) if key_var else None)
    return {"base_url": base_url, "model": os.environ.get(MODEL_ENV) or table.get("model"), "api_key": api_key}
