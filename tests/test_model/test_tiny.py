"""The tiny checkpoint loads like a hub SmolVLM and answers an image question; the real-sized archs have real shapes."""

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from model.tiny import ARCHS, SPECIAL_TOKENS, arch_config, build_processor, build_tiny_model

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]


def red_circle_photo() -> Image.Image:
    image = Image.new("RGB", (200, 120), "white")
    ImageDraw.Draw(image).ellipse((60, 20, 140, 100), fill="red")
    return image


def test_checkpoint_answers_an_image_question(tiny_model_dir: Path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[red_circle_photo()], return_tensors="pt")

    # 200x120 is resized to 128x77 and split into 4x3 tiles of 32 px, plus the global image.
    tiles = inputs["pixel_values"].shape[1]
    assert tiles == 4 * 3 + 1
    image_tokens = (inputs["input_ids"][0] == model.config.image_token_id).sum().item()
    assert image_tokens == tiles * processor.image_seq_len

    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) > 0
    assert isinstance(processor.decode(new_tokens, skip_special_tokens=True), str)


def test_config_ids_match_the_tokenizer(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size >= len(tokenizer)
    generation = model.generation_config
    for role, token in [("eos", "<end_of_utterance>"), ("pad", "<|im_end|>"), ("bos", "<|im_start|>")]:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert getattr(generation, f"{role}_token_id") == getattr(tokenizer, f"{role}_token_id") == token_id
    assert model.dtype == torch.float32


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The image shows 3 purple triangles, a cat & a dog (maybe)! Zebra? Ünïcode 🐈"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(f"a{token}b")[1:-1] == [tokenizer.convert_tokens_to_ids(token)], token

    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>User:<image>What colour?<end_of_utterance>\nAssistant:"


def test_same_seed_same_weights(tmp_path: Path):
    first = build_tiny_model(tmp_path / "a", seed=0)
    second = build_tiny_model(tmp_path / "b", seed=0)
    other = build_tiny_model(tmp_path / "c", seed=1)
    weights = [(d / "model.safetensors").read_bytes() for d in (first, second, other)]
    assert weights[0] == weights[1] != weights[2]


def test_unknown_arch_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="smolvlm-256m"):
        build_tiny_model(tmp_path / "out", arch="smolvlm-7b")
    assert not (tmp_path / "out").exists()
    assert ARCHS == ("tiny", "smolvlm-256m", "smolvlm-2b")


def test_256m_config_has_the_real_dimensions():
    config = arch_config("smolvlm-256m")
    text, vision = config.text_config, config.vision_config
    assert (text.model_type, text.hidden_size, text.intermediate_size) == ("llama", 576, 1536)
    assert (text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers) == (9, 3, 30)
    assert (text.rms_norm_eps, text.rope_parameters["rope_theta"]) == (1e-5, 100_000)
    assert (text.max_position_embeddings, text.vocab_size, text.tie_word_embeddings) == (8192, 49280, False)
    assert (vision.hidden_size, vision.intermediate_size, vision.num_attention_heads) == (768, 3072, 12)
    assert (vision.num_hidden_layers, vision.image_size, vision.patch_size) == (12, 512, 16)
    assert config.scale_factor == 4


@pytest.mark.parametrize(
    ("arch", "longest_edge", "tile", "image_seq_len"),
    [("tiny", 128, 32, 4), ("smolvlm-256m", 2048, 512, 64), ("smolvlm-2b", 1536, 384, 81)],
)
def test_processor_fits_the_vision_encoder(arch: str, longest_edge: int, tile: int, image_seq_len: int):
    processor = build_processor(arch_config(arch))
    assert processor.image_processor.size["longest_edge"] == longest_edge
    assert processor.image_processor.max_image_size["longest_edge"] == tile
    assert processor.image_seq_len == image_seq_len
