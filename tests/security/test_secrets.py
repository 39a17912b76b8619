"""Secrets stay on the host side: root-only files outside the store, hidden from repr and from the logs."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from banger.errors import InvalidInputError, NotFoundError
from banger.security.secrets import SecretVault, install_redaction


def test_vault_files_are_private_and_values_hidden(tmp_path: Path) -> None:
    vault = SecretVault(tmp_path / "secrets")
    secret = vault.put("provider-key", "sk-test-0123456789")
    assert stat.S_IMODE(os.stat(tmp_path / "secrets").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "secrets" / "provider-key").st_mode) == 0o600
    assert "sk-test" not in repr(secret) and "sk-test" not in str(secret) and "sk-test" not in f"{secret}"
    assert vault.get("provider-key").reveal() == "sk-test-0123456789"
    assert vault.names() == ["provider-key"]
    with pytest.raises(InvalidInputError):
        vault.put("../escape", "x")
    vault.remove("provider-key")
    with pytest.raises(NotFoundError):
        vault.get("provider-key")


def test_log_lines_never_carry_a_secret(tmp_path: Path) -> None:
    log_file = tmp_path / "daemon.log"
    logger = logging.getLogger("banger.test.secrets")
    handler = logging.FileHandler(log_file)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        install_redaction(logger)
        value = SecretVault(tmp_path / "s").put("k", "hunter2-very-secret").reveal()
        logger.warning("starting agent with key %s", value)
        logger.warning(f"env: KEY={value}")
        handler.flush()
        text = log_file.read_text()
        assert "hunter2" not in text and text.count("***") == 2
    finally:
        logger.removeHandler(handler)
        handler.close()
