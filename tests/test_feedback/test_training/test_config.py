"""The job's arguments: defaults, then the settings (SMOLCORD_TRAIN_METHOD, SMOLCORD_TRAIN_ARGS), then flags."""

import pytest

from feedback.training.config import GateArguments, TrainArguments, parse_arguments
from smolcord.settings import Settings


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_without_settings_the_defaults_hold() -> None:
    run, train, gate = parse_arguments(settings())
    assert run.method == "dpo" and train == TrainArguments() and gate == GateArguments()


def test_settings_set_the_method_and_any_hyperparameter_and_flags_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMOLCORD_TRAIN_METHOD", "kto")
    monkeypatch.setenv(
        "SMOLCORD_TRAIN_ARGS", "--learning_rate 0.001 --num_train_epochs 3 --eval_batch_size 2"
    )
    from_env = settings()
    run, train, gate = parse_arguments(from_env)
    assert run.method == "kto" and train.learning_rate == 0.001 and train.num_train_epochs == 3.0
    assert gate.eval_batch_size == 2 and train.lora_r == TrainArguments().lora_r
    run, train, _ = parse_arguments(from_env, ["--learning_rate", "0.002", "--method", "dpo"])
    assert run.method == "dpo" and train.learning_rate == 0.002 and train.num_train_epochs == 3.0


def test_a_bad_flag_in_the_settings_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_arguments(settings(train_args="--no_such_flag 1"))
    assert exit_.value.code == 2


def test_sft_then_dpo_and_the_lora_targets_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLCORD_TRAIN_METHOD", "sft+dpo")
    monkeypatch.setenv("SMOLCORD_TRAIN_ARGS", "--lora_targets text+connector")
    run, train, _ = parse_arguments(settings())
    assert run.method == "sft+dpo" and train.lora_targets == "text+connector"
    assert TrainArguments().lora_targets == "text"
    with pytest.raises(SystemExit):
        parse_arguments(settings(train_args="--lora_targets vision"))
