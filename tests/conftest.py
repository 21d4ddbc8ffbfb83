"""Fixtures shared by every test folder."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SmolVLM-shaped checkpoint (tokenizer, processor, random weights), built once per session."""
    # Imported here so that test sessions which never ask for the model do not load torch.
    from model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
