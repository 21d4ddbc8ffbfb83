"""Merged adapters compute what peft computes, swap without drift or reallocation, and refuse what they cannot merge."""

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, Idefics3ForConditionalGeneration

from model.adapters import AdapterError, MergedAdapters
from model.tiny import arch_config

TEXT_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# Ordinary text tokens only (no <image> without pixel values).
INPUT_IDS = torch.tensor([[101, 202, 303, 404, 505, 606, 707, 808], [900, 33, 150, 250, 350, 450, 550, 650]])


def peft_adapter(base: torch.nn.Module, out: Path, *, seed: int, **options) -> PeftModel:
    """Saves a LoRA on base's text layers with random (non-zero) B to out; returns the unmerged PeftModel."""
    torch.manual_seed(seed)
    options = {"target_modules": TEXT_TARGETS, "r": 4, "lora_alpha": 8} | options
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    peft_model.save_pretrained(out)
    return peft_model.eval()


def saved(base: torch.nn.Module, out: Path, *, seed: int, **options) -> Path:
    peft_adapter(base, out, seed=seed, **options)
    return out


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def data_ptrs(model: torch.nn.Module) -> dict[str, int]:
    return {name: param.data_ptr() for name, param in model.named_parameters()}


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def edit_config(adapter: Path, **changes) -> Path:
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps(config | changes))
    return adapter


def edit_tensors(adapter: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    save_file(change(load_file(adapter / WEIGHTS)), adapter / WEIGHTS)
    return adapter


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> torch.nn.Module:
    """A pristine copy of the tiny model, never served: the adapters are built on copies of it."""
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def base_state(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    return snapshot(base)


@pytest.fixture(scope="module")
def adapters(base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two plain LoRAs a and b, saved by peft."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: saved(base, root / name, seed=seed) for name, seed in [("a", 1), ("b", 2)]}


@pytest.fixture(scope="module")
def unmerged_a_logits(base: torch.nn.Module, adapters: dict[str, Path]) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(copy.deepcopy(base), adapters["a"]).eval())


@pytest.fixture(scope="module")
def model(base: torch.nn.Module) -> torch.nn.Module:
    """The model the tests serve adapters on; each test leaves it at its base weights."""
    return copy.deepcopy(base)


@pytest.fixture
def served(
    model: torch.nn.Module, base_state: dict[str, torch.Tensor], tiny_model_dir: Path
) -> Iterator[MergedAdapters]:
    adapters = MergedAdapters(model, base_model_id=str(tiny_model_dir))
    yield adapters
    adapters.load(None)
    assert_state(model, base_state)


@pytest.fixture(scope="module")
def merged_a(model: torch.nn.Module, adapters: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The model's weights with adapter a merged (by MergedAdapters, checked against peft elsewhere)."""
    adapters_ = MergedAdapters(model)
    adapters_.load(adapters["a"])
    state = snapshot(model)
    adapters_.load(None)
    return state


# ------------------------------------------------------------------ merging


def test_merged_logits_equal_peft_unmerged_logits(
    served: MergedAdapters, model, base, adapters, unmerged_a_logits, base_state
):
    base_logits = logits(model)
    served.load(adapters["a"])
    assert served.version == "a"
    merged = logits(model)
    assert (merged - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(merged, unmerged_a_logits, atol=1e-4, rtol=0)
    peft_merged = PeftModel.from_pretrained(copy.deepcopy(base), adapters["a"]).merge_and_unload()
    for name, tensor in snapshot(peft_merged).items():
        torch.testing.assert_close(model.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert len(served.merged_modules) == 14
    assert served.base_copy_bytes == sum(
        model.get_submodule(name).weight.numel() * 4 for name in served.merged_modules
    )


def test_many_swaps_end_exactly_where_one_load_does_and_never_reallocate(
    served: MergedAdapters, model, adapters, base_state
):
    pointers = data_ptrs(model)
    served.load(adapters["b"])
    once_b = snapshot(model)
    served.load(None)
    assert served.version is None
    assert_state(model, base_state)

    for _ in range(10):
        for step in ("a", "b", "a", None, "b"):
            served.load(adapters[step] if step else None)
            assert served.version == step
    assert_state(model, once_b)
    served.load(None)
    assert_state(model, base_state)
    assert data_ptrs(model) == pointers


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rslora_and_rank_alpha_patterns_merge_as_peft_does(
    served: MergedAdapters, model, base, tmp_path, use_rslora
):
    options = dict(
        use_rslora=use_rslora,
        # peft's semantics: a key matches the whole name or a dotted suffix; the first match wins.
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 8, "up_proj": 6},
        alpha_pattern={"v_proj": 32, "layers.0.mlp.up_proj": 3},
    )
    peft_model = peft_adapter(base, tmp_path / "patterned", seed=3, **options)
    assert peft_model.base_model.model.model.text_model.layers[1].mlp.down_proj.r["default"] == 8
    expected = snapshot(peft_model.merge_and_unload())

    served.load(tmp_path / "patterned")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


def test_fan_in_fan_out_on_linear_layers_is_ignored_as_peft_does(
    served: MergedAdapters, model, adapters, merged_a, tmp_path
):
    served.load(edit_config(copy_adapter(adapters["a"], tmp_path / "a"), fan_in_fan_out=True))
    assert_state(model, merged_a)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("base_model.model.model.", "base_model.model."),  # trained on the inner Idefics3Model
        ("base_model.model.", "base_model.model.wrapper."),  # trained inside a wrapper module
        ("base_model.model.", ""),  # saved without peft's prefix
    ],
)
def test_module_names_map_across_prefix_conventions(
    served: MergedAdapters, model, adapters, merged_a, tmp_path, old, new
):
    adapter = copy_adapter(adapters["a"], tmp_path / "a")
    edit_tensors(adapter, lambda tensors: {key.replace(old, new, 1): t for key, t in tensors.items()})
    served.load(adapter)
    assert_state(model, merged_a)


def test_pickled_weights_load_too(served: MergedAdapters, model, adapters, merged_a, tmp_path):
    adapter = copy_adapter(adapters["a"], tmp_path / "a")
    torch.save(load_file(adapter / WEIGHTS), adapter / "adapter_model.bin")
    (adapter / WEIGHTS).unlink()
    served.load(adapter)
    assert_state(model, merged_a)


def test_a_compiled_model_is_served_through_its_original_module(model, adapters, merged_a, base_state):
    adapters_ = MergedAdapters(torch.compile(model))  # wrapping compiles nothing until the first call
    adapters_.load(adapters["a"])
    assert_state(model, merged_a)
    adapters_.load(None)
    assert_state(model, base_state)


def test_version_defaults_to_the_resolved_directory_name(served: MergedAdapters, adapters, tmp_path):
    (tmp_path / "current").symlink_to(adapters["b"])
    served.load(tmp_path / "current")
    assert served.version == "b"
    served.load(adapters["a"], version="v7")
    assert served.version == "v7"


def test_inspect_reads_an_adapter_without_a_model(adapters):
    info = MergedAdapters.inspect(adapters["a"])
    assert info["peft_type"] == "LORA"
    assert (info["r"], info["lora_alpha"]) == (4, 8)
    assert len(info["target_modules"]) == 14
    assert "model.text_model.layers.1.mlp.down_proj" in info["target_modules"]
    assert info["bytes"] == (adapters["a"] / WEIGHTS).stat().st_size


# ------------------------------------------------------------------ refusals
# Each case turns a copy of adapter a (or builds another adapter beside it) into one that must be refused.

LAYER0_Q = "base_model.model.model.text_model.layers.0.self_attn.q_proj"
EMBED = "base_model.model.model.text_model.embed_tokens"


def dora(base, a: Path) -> Path:
    return saved(base, a.with_name("dora"), seed=5, use_dora=True)


def dora_tensors_only(base, a: Path) -> Path:
    return edit_tensors(a, lambda t: t | {f"{LAYER0_Q}.lora_magnitude_vector": torch.ones(64)})


def modules_to_save(base, a: Path) -> Path:
    return saved(base, a.with_name("mts"), seed=6, modules_to_save=["lm_head"])


def another_model_size(base, a: Path) -> Path:
    config = arch_config("tiny")
    config.text_config.hidden_size, config.text_config.intermediate_size = 32, 96
    return saved(Idefics3ForConditionalGeneration(config), a.with_name("smaller"), seed=4)


def missing_module(base, a: Path) -> Path:
    return edit_tensors(a, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})


def embedding_target(base, a: Path) -> Path:
    lora = {f"{EMBED}.lora_A.weight": torch.ones(4, 1024), f"{EMBED}.lora_B.weight": torch.ones(64, 4)}
    return edit_tensors(a, lambda t: t | lora)


def lora_b_missing(base, a: Path) -> Path:
    return edit_tensors(a, lambda t: {k: v for k, v in t.items() if not k.startswith(f"{LAYER0_Q}.lora_B")})


def truncated(base, a: Path) -> Path:
    data = (a / WEIGHTS).read_bytes()
    (a / WEIGHTS).write_bytes(data[: len(data) // 2])
    return a


def nan_weights(base, a: Path) -> Path:
    def poison(tensors):
        tensors[f"{LAYER0_Q}.lora_B.weight"][0, 0] = float("nan")
        return tensors

    return edit_tensors(a, poison)


def corrupt_config(base, a: Path) -> Path:
    (a / CONFIG).write_text('{"peft_type": "LO')
    return a


def no_weights(base, a: Path) -> Path:
    (a / WEIGHTS).unlink()
    return a


def configured(**changes) -> Callable[[torch.nn.Module, Path], Path]:
    return lambda base, a: edit_config(a, **changes)


BROKEN = {
    "DoRA": (dora, "DoRA"),
    "DoRA magnitude without use_dora": (dora_tensors_only, "DoRA"),
    "modules_to_save": (modules_to_save, "modules_to_save"),
    "r in config differs from the tensors": (configured(r=8), "config says r=8"),
    "another model size": (another_model_size, "another model size"),
    "a module this model lacks": (missing_module, "does not have"),
    "an embedding": (embedding_target, "only Linear"),
    "lora_B missing": (lora_b_missing, "no lora_B"),
    "truncated safetensors": (truncated, "unreadable"),
    "NaN weights": (nan_weights, "NaN"),
    "corrupt config": (corrupt_config, "unreadable"),
    "no weights file": (no_weights, "neither"),
    "no directory": (lambda base, a: a.with_name("nowhere"), "does not exist"),
    "LoHa": (configured(peft_type="LOHA"), "only LORA"),
    "trained biases": (configured(bias="all"), "biases"),
    "PiSSA init": (configured(init_lora_weights="pissa"), "rewrites the base"),
    "layer replication": (configured(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
    "an unknown option": (configured(shiny_new_variant={"on": True}), "does not know"),
    "another base model": (
        configured(base_model_name_or_path="HuggingFaceTB/SmolVLM-Instruct"),
        "trained on",
    ),
    "an invalid pattern": (configured(rank_pattern={"q_proj(": 2}), "not a valid regex"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_refused_adapters_leave_weights_and_version_alone(
    served: MergedAdapters, model, base, adapters, merged_a, tmp_path, case
):
    served.load(adapters["a"])
    pointers = data_ptrs(model)
    break_, message = BROKEN[case]
    broken = break_(base, copy_adapter(adapters["a"], tmp_path / "broken"))

    with pytest.raises(AdapterError, match=message):
        served.load(broken)
    assert served.version == "a"
    assert_state(model, merged_a)
    assert data_ptrs(model) == pointers
