from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from salon.settings import DEFAULT_MODEL, Settings


def test_defaults_need_no_services(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SALON_MODELS", "SALON_DATABASE_URL", "SALON_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.default_model == DEFAULT_MODEL
    assert settings.database.startswith("sqlite+aiosqlite:///")


def test_environment_and_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "salon.toml"
    config.write_text('port = 9000\n[providers.vllm]\nkind = "openai"\nbase_url = "http://h/v1"\n')
    monkeypatch.setenv("SALON_CONFIG_FILE", str(config))
    monkeypatch.setenv("SALON_MODELS", "vllm:llama, fake:echo")
    monkeypatch.setenv("SALON_EMBEDDED__THREADS", "3")
    monkeypatch.setenv("SALON_PORT", "8001")
    settings = Settings()
    assert settings.models == ["vllm:llama", "fake:echo"]
    assert settings.embedded.threads == 3
    assert settings.port == 8001  # the environment wins over the file
    assert settings.providers["vllm"].base_url == "http://h/v1"


def test_model_ids_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SALON_MODELS", "no-provider")
    with pytest.raises(ValidationError, match="provider:model"):
        Settings()
