"""Settings parse from the environment and from `.env`, with clear errors."""

import pytest
from pydantic import ValidationError

from smolcord.settings import Settings, parse_size


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No SMOLCORD_* / DISCORD_TOKEN from the caller's shell, and a cwd without a `.env`."""
    import os

    for key in list(os.environ):
        if key.startswith("SMOLCORD_") or key == "DISCORD_TOKEN":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults_work_on_one_machine(clean_env, tmp_path):
    s = Settings()
    assert s.discord_token is None
    assert s.model == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert s.worker_url == "http://127.0.0.1:8700"
    assert s.worker_host_port == ("127.0.0.1", 8700)
    assert s.max_image_bytes == 10 * 1024 * 1024
    assert s.max_image_pixels == 40_000_000
    assert s.attachment_hosts == ["https://cdn.discordapp.com/", "https://media.discordapp.net/"]
    assert s.admin_ids == [] and s.channels == []
    assert s.train_at == "03:00" and s.learning_default is False and s.fast_path is False
    assert s.db_url == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'smolcord.db'}"


def test_environment_with_comma_lists(clean_env):
    clean_env.setenv("DISCORD_TOKEN", "abc.def")
    clean_env.setenv("SMOLCORD_ADMIN_IDS", "123, 456,")
    clean_env.setenv("SMOLCORD_CHANNELS", "789")
    clean_env.setenv("SMOLCORD_ATTACHMENT_HOSTS", "http://127.0.0.1:9999/cdn/")
    clean_env.setenv("SMOLCORD_MAX_IMAGE_BYTES", "2 MiB")
    clean_env.setenv("SMOLCORD_MAX_IMAGE_PIXELS", "12M")
    clean_env.setenv("SMOLCORD_FAST_PATH", "on")
    clean_env.setenv("SMOLCORD_ADAPTER_ENDPOINTS", "off")
    clean_env.setenv("SMOLCORD_TRAIN_AT", "off")
    clean_env.setenv("SMOLCORD_DATABASE_URL", "postgresql+asyncpg://u:p@db/smolcord")
    s = Settings()
    assert s.discord_token is not None and s.discord_token.get_secret_value() == "abc.def"
    assert "abc.def" not in repr(s)  # secrets never reach logs
    assert s.admin_ids == [123, 456] and s.channels == [789]
    assert s.attachment_hosts == ["http://127.0.0.1:9999/cdn/"]
    assert s.max_image_bytes == 2 * 1024 * 1024 and s.max_image_pixels == 12_000_000
    assert s.fast_path is True and s.adapter_endpoints is False and s.train_at is None
    assert s.db_url == "postgresql+asyncpg://u:p@db/smolcord"


def test_dotenv_file(clean_env, tmp_path):
    (tmp_path / ".env").write_text(
        "SMOLCORD_MAX_TOKENS=64\nSMOLCORD_TRAIN_AT=4:05\nDISCORD_TOKEN=from-file\n"
    )
    s = Settings()
    assert s.max_tokens == 64 and s.train_at == "04:05"
    assert s.discord_token.get_secret_value() == "from-file"
    clean_env.setenv("SMOLCORD_MAX_TOKENS", "32")  # the environment wins over the file
    assert Settings().max_tokens == 32


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMOLCORD_TRAIN_AT", "25:00"),
        ("SMOLCORD_ATTACHMENT_HOSTS", "cdn.discordapp.com"),
        ("SMOLCORD_ADMIN_IDS", "alice"),
        ("SMOLCORD_MAX_IMAGE_BYTES", "lots"),
        ("SMOLCORD_MAX_BATCH", "0"),
    ],
)
def test_bad_values_are_refused_by_name(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert name.removeprefix("SMOLCORD_").lower() in str(info.value)


def test_parse_size():
    assert parse_size("10 MiB") == 10 * 1024**2
    assert parse_size("40 M") == 40_000_000
    assert parse_size("1.5k") == 1500
    assert parse_size(7) == 7


@pytest.mark.parametrize(("value", "channels"), [("all", []), ("ALL", []), ("", []), ("1, 2", [1, 2])])
def test_channels_all_is_the_documented_default(clean_env, value, channels):
    clean_env.setenv("SMOLCORD_CHANNELS", value)
    assert Settings().channels == channels
    clean_env.setenv("SMOLCORD_CHANNELS", "all,1")  # "all" means every channel: never beside ids
    with pytest.raises(ValidationError):
        Settings()


def test_canary_settings(clean_env):
    s = Settings()
    assert s.canary is True
    assert (s.canary_share, s.canary_margin, s.canary_min_rated) == (0.2, 0.05, 30)
    assert (s.canary_max_days, s.canary_confidence) == (7, 0.95)
    clean_env.setenv("SMOLCORD_CANARY", "off")
    clean_env.setenv("SMOLCORD_CANARY_SHARE", "0.5")
    clean_env.setenv("SMOLCORD_CANARY_MAX_DAYS", "0.5")
    s = Settings()
    assert s.canary is False and s.canary_share == 0.5 and s.canary_max_days == 0.5
    clean_env.setenv("SMOLCORD_CANARY", "on")
    assert Settings().canary is True


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SMOLCORD_CANARY_SHARE", "0"),
        ("SMOLCORD_CANARY_SHARE", "1"),
        ("SMOLCORD_CANARY_SHARE", "1.5"),
        ("SMOLCORD_CANARY_MARGIN", "-0.1"),
        ("SMOLCORD_CANARY_MARGIN", "1"),
        ("SMOLCORD_CANARY_MIN_RATED", "0"),
        ("SMOLCORD_CANARY_MAX_DAYS", "0"),
        ("SMOLCORD_CANARY_CONFIDENCE", "0.5"),
        ("SMOLCORD_CANARY_CONFIDENCE", "1"),
        ("SMOLCORD_CANARY", "maybe"),
    ],
)
def test_canary_settings_are_validated(clean_env, variable, value):
    clean_env.setenv(variable, value)
    with pytest.raises(ValidationError, match=variable.removeprefix("SMOLCORD_").lower()):
        Settings()
