"""Fixtures shared by every test folder."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests: reproducible and bounded on CI and on a developer's machine alike; a deeper
# local search is `HYPOTHESIS_PROFILE=deep make test`.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("deep", deadline=None, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SmolVLM-shaped checkpoint (tokenizer, processor, random weights), built once per session."""
    # Imported here so that test sessions which never ask for the model do not load torch.
    from model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def warm_start_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulation's warm start of the tiny model (answers in the world's words, at chance), built once."""
    from feedback.training.warmstart import build_warm_start

    return build_warm_start(tiny_model_dir, tmp_path_factory.mktemp("warm-start") / "warm", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    """The worker's engine on the tiny model, loaded once for every test that runs a real worker."""
    from model.engine import Engine

    return Engine.load(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def migrated_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once; tests copy it instead of migrating again."""
    from feedback.store.db import upgrade_to_head

    path = tmp_path_factory.mktemp("db-template") / "smolcord.db"
    upgrade_to_head(f"sqlite+aiosqlite:///{path}")
    return path
