"""Typed settings for every part, read from the environment and an optional `.env`."""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Parse `10485760`, `10 MiB`, `40M` or `40 M` into an int (`Mi` is 1024², `M` is 10⁶)."""
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (try 10485760, 10MiB or 40M)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    power = " kmgt".index(prefix.lower() or " ")
    return int(float(number) * base**power)


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(",") if part.strip()]


DISCORD_TOKEN_HELP = """\
DISCORD_TOKEN is not set. To get one:
  1. Open https://discord.com/developers/applications and press "New Application".
  2. In "Bot", press "Reset Token" and copy it. No privileged intent is needed.
  3. Put it in a .env file beside where you run smolcord:  DISCORD_TOKEN=...
  4. Invite the bot: in "OAuth2 → URL Generator" tick `bot` and `applications.commands`, then the
     permissions View Channels, Send Messages, Send Messages in Threads, Read Message History,
     Add Reactions, Attach Files and Embed Links; open the generated URL and pick your server.
The README walks through it with screenshots' worth of detail."""


class MissingDiscordToken(RuntimeError):
    """DISCORD_TOKEN is not set; the message says how to get one (the CLI prints it and exits 2)."""

    def __init__(self) -> None:
        super().__init__(DISCORD_TOKEN_HELP)


CommaList = Annotated[list[str], NoDecode]
CommaIds = Annotated[list[int], NoDecode]


class Settings(BaseSettings):
    """Every setting of DESIGN.md; each default works on one machine."""

    model_config = SettingsConfigDict(
        env_prefix="SMOLCORD_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    discord_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DISCORD_TOKEN", "SMOLCORD_DISCORD_TOKEN")
    )
    data_dir: Path = Path("./data")
    database_url: str | None = None

    # model worker
    model: str = "HuggingFaceTB/SmolVLM-256M-Instruct"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float16 | float32
    fast_path: bool = False
    kv_cache_gib: float = 8.0
    adapter_endpoints: bool = True
    worker_url: str = "http://127.0.0.1:8700"
    worker_token: SecretStr | None = None
    # A worker listening beyond loopback without worker_token refuses to start unless this says so
    # (`smolcord worker --allow-open`): anyone who reaches it could use it.
    worker_allow_open: bool = False
    # The `model` the bot asks for. Unset: none is sent and the smolcord worker answers with what it
    # serves. Another OpenAI-compatible server: its model's name, or a loaded LoRA's (vLLM, README).
    worker_model: str | None = None
    max_tokens: int = 512
    max_batch: int = Field(default=16, ge=1)
    batch_wait_ms: float = Field(default=10, ge=0)
    # continuous: requests join the running batch at the next decode step (model/continuous.py);
    # static: one generate call per batch, new requests wait for its longest row (the baseline).
    scheduler: Literal["continuous", "static"] = "continuous"
    max_queue: int = Field(default=64, ge=1)
    request_timeout_s: float = Field(default=120, gt=0)
    # Bytes of request bodies the worker holds at once while reading and decoding them, across
    # requests (never less than one body of the largest size); a body that does not fit gets 429.
    body_budget: int = 256 * 1024 * 1024

    # images
    max_images: int = Field(default=4, ge=1)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_image_edge: int = Field(default=1536, ge=16)
    attachment_hosts: CommaList = Field(
        default_factory=lambda: ["https://cdn.discordapp.com/", "https://media.discordapp.net/"]
    )

    # bot
    admin_ids: CommaIds = Field(default_factory=list)
    dev_guild_id: int | None = None
    channels: CommaIds = Field(default_factory=list)  # empty or "all": every channel the bot can see
    allow_dms: bool = True
    cooldown_s: float = Field(default=10, ge=0)
    guild_inflight: int = Field(default=4, ge=1)  # per server; in DMs, one per user
    # Across every server and DM together: the worker's default batch (SMOLCORD_MAX_BATCH), so no
    # single place can fill the worker and everything in flight can decode at once.
    total_inflight: int = Field(default=16, ge=1)
    history_turns: int = Field(default=6, ge=0)
    history_images: int = Field(default=2, ge=0)
    # First answers: greedy by default. Sampled (> 0), they are drawn like the 🔁 alternatives, so a
    # preference pair cannot be told apart by which answer came first (see README "The promotion gate").
    answer_temperature: float = Field(default=0.0, ge=0)
    regen_temperature: float = Field(default=0.7, ge=0)
    # Nucleus sampling for 🔁: the alternative stays among the answers the model finds plausible (a
    # sharpened adapter at temperature 1 without it wanders into word salad nobody can vote on).
    regen_top_p: float = Field(default=0.9, gt=0, le=1)
    regen_per_hour: int = Field(default=10, ge=0)

    # data and learning
    learning_default: bool = False
    max_voter_share: float = Field(default=0.5, gt=0, le=1)
    retention_days: int = Field(default=90, ge=1)
    # After the bot is removed from a server, its data waits this long (a re-invite keeps it), then goes.
    guild_grace_days: int = Field(default=7, ge=0)
    train_at: str | None = "03:00"  # HH:MM UTC; "off" disables the nightly run
    min_new_pairs: int = Field(default=16, ge=0)
    heldout_fraction: float = Field(default=0.2, gt=0, lt=1)
    gate_min_heldout: int = Field(default=16, ge=0)
    gate_margin: float = 0.05
    # The gate's one-sided sign test must reject "no better than current" at this confidence, spent
    # over every candidate tested against one served version (feedback/training/gate.py); 0 turns
    # the test off.
    gate_confidence: float = Field(default=0.95, ge=0.0, lt=1.0)
    keep_versions: int = Field(default=5, ge=1)
    # Canary rollout (feedback.store.canary): a gated candidate first serves a sticky share of users,
    # and their 👍 share against current's decides. off: a gated candidate is promoted at once.
    canary: bool = True
    canary_share: float = Field(default=0.2, gt=0, lt=1)  # of users, by a hash of user id and version
    # The candidate may be this much worse in 👍 share (0.05: five points) and still be promoted.
    canary_margin: float = Field(default=0.05, ge=0, lt=1)
    # Rated answers (net vote ≠ 0) each arm needs before the live votes decide.
    canary_min_rated: int = Field(default=30, ge=1)
    # Days after which an undecided canary is promoted (the offline gate's verdict) unless votes lean against it.
    canary_max_days: float = Field(default=7, gt=0)
    # Posterior probability the live decision needs; above 0.5, so promote and reject never both hold.
    canary_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    # The training job: the nightly run's method, and flags of `python -m feedback.training --help`
    # (e.g. "--learning_rate 1e-4 --num_train_epochs 4") that every run takes before its own.
    train_method: Literal["dpo", "kto", "sft+dpo"] = "dpo"
    train_args: str = ""

    @field_validator("max_image_bytes", "max_image_pixels", "body_budget", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("attachment_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> list[str]:
        hosts = _split(value)
        for host in hosts:
            if not re.match(r"^https?://[^/]+/", host):
                raise ValueError(f"attachment host {host!r} must be a URL prefix ending in '/'")
        return hosts

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> list[int]:
        return [int(v) for v in _split(value)]

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, value: Any) -> list[int]:
        parts = _split(value)
        if [part.lower() for part in parts] == ["all"]:  # the documented default, spelled out
            return []
        return [int(v) for v in parts]

    @field_validator("dev_guild_id", "database_url", "worker_token", "worker_model", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("train_at", mode="before")
    @classmethod
    def _train_at(cls, value: Any) -> str | None:
        if value is None or str(value).strip().lower() in {"off", "", "none", "false"}:
            return None
        match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", str(value).strip())
        if not match:
            raise ValueError(f"SMOLCORD_TRAIN_AT must be HH:MM (UTC) or 'off', got {value!r}")
        return f"{int(match.group(1)):02d}:{match.group(2)}"

    # derived paths: the one data dir every part shares
    @cached_property
    def db_url(self) -> str:
        """The SQLAlchemy async URL of the feedback store."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'smolcord.db').resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def locks_dir(self) -> Path:
        return self.data_dir / "locks"

    def require_discord_token(self) -> str:
        """The Discord token; MissingDiscordToken, saying how to get one, when it is not set."""
        if self.discord_token is None:
            raise MissingDiscordToken()
        return self.discord_token.get_secret_value()

    @property
    def worker_host_port(self) -> tuple[str, int]:
        """Where `smolcord worker` listens by default: the host and port of SMOLCORD_WORKER_URL."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.worker_url)
        return parts.hostname or "127.0.0.1", parts.port or 8700


# Names the file read besides the environment (default `.env` in the working directory); `off`:
# none. The bot starts its training job with `off`: the job's settings are spelled out in its
# environment, and the `.env` the README tells operators to put DISCORD_TOKEN in stays unread.
ENV_FILE_VARIABLE = "SMOLCORD_ENV_FILE"


def get_settings(**overrides: Any) -> Settings:
    """Read settings now (environment and `.env`, see ENV_FILE_VARIABLE), with keyword overrides on top."""
    env_file = os.environ.get(ENV_FILE_VARIABLE, ".env").strip()
    overrides.setdefault("_env_file", None if env_file.lower() in {"", "off", "none"} else env_file)
    return Settings(**overrides)
