"""Builds local SmolVLM-shaped checkpoints (tokenizer, processor, random weights) for tests, demos and benchmarks."""

from __future__ import annotations

from itertools import cycle
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)

ARCHS = ("tiny", "smolvlm-256m", "smolvlm-2b")

# SmolVLM's own chat template, verbatim: the role capitalised, no space after "User:" when the turn
# opens with an image, every turn closed by <end_of_utterance>.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The trainer gives special tokens the first ids in this order, so 0/1/2 match the real SmolVLM
# (<|endoftext|>, <|im_start|>, <|im_end|>) and the other ids are known before any training.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
)
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")
BOS_TOKEN_ID = SPECIAL_TOKENS.index("<|im_start|>")
EOS_TOKEN_ID = SPECIAL_TOKENS.index("<end_of_utterance>")
PAD_TOKEN_ID = SPECIAL_TOKENS.index("<|im_end|>")

# Small enough to keep the tiny model's embedding and lm_head cheap; the corpus below fills it.
TOKENIZER_VOCAB_SIZE = 1024

# The processor resizes the longest edge to this many vision tiles (SmolVLM: 4 x 512 = 2048, 4 x 384 = 1536).
TILES_PER_EDGE = 4

# (text llama, vision encoder, scale_factor). The two real ones are copied from the configs of
# HuggingFaceTB/SmolVLM-256M-Instruct and HuggingFaceTB/SmolVLM-Instruct.
_ARCH_DIMENSIONS: dict[str, tuple[dict, dict, int]] = {
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, rope_theta=100_000.0, max_position_embeddings=2048,
             vocab_size=TOKENIZER_VOCAB_SIZE),
        # 32 px / patch 8 = 4 x 4 patches; pixel shuffle by 2 leaves 4 <image> tokens per tile.
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
             image_size=32, patch_size=8),
        2,
    ),
    "smolvlm-256m": (
        dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
             num_hidden_layers=30, rope_theta=100_000.0, max_position_embeddings=8192, vocab_size=49280),
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
             image_size=512, patch_size=16),
        4,
    ),
    "smolvlm-2b": (
        dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
             num_hidden_layers=24, rope_theta=273_768.0, max_position_embeddings=16384, vocab_size=49155),
        dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
             image_size=384, patch_size=14),
        3,
    ),
}  # fmt: skip


def arch_config(arch: str) -> Idefics3Config:
    """The model config of one of ARCHS, with SmolVLM's special token ids."""
    if arch not in _ARCH_DIMENSIONS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    text, vision, scale_factor = _ARCH_DIMENSIONS[arch]
    text = dict(text)
    rope_theta = text.pop("rope_theta")
    return Idefics3Config(  # type: ignore[call-arg]  # pad_token_id: accepted at run time
        text_config=dict(
            model_type="llama",
            **text,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
            tie_word_embeddings=False,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=PAD_TOKEN_ID,
        ),
        vision_config=vision,
        scale_factor=scale_factor,
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=False,
        pad_token_id=PAD_TOKEN_ID,  # Idefics3Config's own default is Llama 3's 128002
    )


def _corpus() -> list[str]:
    """Short English sentences of the kind a model answers about images (deterministic)."""
    colours = "red green blue yellow black white orange purple pink brown grey gold silver".split()
    shapes = "circle square triangle rectangle star line dot stripe oval heart arrow cross".split()
    things = """cat dog car tree house person man woman child baby ball cup book bird flower table chair
        phone sign boat apple banana pizza cake bottle glass plate shirt hat shoe bag window door wall
        road bridge river mountain cloud sun moon horse cow sheep bicycle bus train plane computer
        screen keyboard clock lamp bed sofa picture painting logo letter word chart graph map""".split()
    sizes = "big small large tiny tall short bright dark round old new shiny wooden metal plastic".split()
    actions = """sitting standing running holding flying lying eating drinking looking walking playing
        smiling reading writing driving riding sleeping jumping""".split()
    scenes = """kitchen street park beach room field forest city office garden sky table floor grass snow
        water desk shop restaurant stadium airport station""".split()
    places = "on the left|on the right|in the middle|at the top|at the bottom|in the background".split("|")
    numbers = "zero one two three four five six seven eight nine ten eleven twelve twenty hundred".split()
    lines = [
        "User: Describe this photo. Assistant: The image shows a cat sitting on a chair.",
        "I'm not sure, but it could be a dog - or maybe a cat. Sorry: the photo is blurry...",
        'Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 50 100 2024. "Quotes", [brackets] & more #1 @ 50% * 2 = 100/1',
        "This is a screenshot of text, a chart, a drawing, a meme or a diagram.",
    ]
    # Every word in several contexts (sentence start, after a space, before punctuation) so BPE
    # learns whole words; cycling the short lists along the things keeps the corpus a couple of thousand
    # lines, trained in well under a second (zip stops at the only finite one).
    words = zip(
        things * 6, *map(cycle, (colours, shapes, sizes, actions, scenes, places, numbers)), strict=False
    )
    for i, (thing, colour, shape, size, action, scene, place, number) in enumerate(words):
        lines += [
            f"The image shows a {colour} {thing} {place}.",
            f"What colour is the {thing}? It is {colour}. Is it {size}? Yes!",
            f"A {size} {thing} is {action} in the {scene}, next to a {colour} {shape}.",
            f"How many {thing}s are there? There are {number} ({i}) {thing}s; {shape.capitalize()}s: {i % 7}.",
            f"{thing.capitalize()}, {colour}, {size}, {action}, {scene}, {shape}: a {thing}",
        ]
    return lines


def build_tokenizer(*, model_max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on _corpus(), with SmolVLM's special tokens and chat template."""
    # The same pipeline as SmolLM2's tokenizer.json: GPT-2 byte level, no prefix space, untrimmed
    # offsets (the Idefics3 processor maps characters to tokens to count image spans).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, so no <unk> ever
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[3:]),  # the first three are unk, bos and pad
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def build_processor(config: Idefics3Config) -> Idefics3Processor:
    """SmolVLM's processor, sized for the vision encoder in config."""
    vision: Any = config.vision_config  # typed as a union in transformers; a config object here
    text: Any = config.text_config
    image_size = vision.image_size
    # The PIL backend needs no torchvision; it saves as "Idefics3ImageProcessor", so loading picks
    # the torchvision backend wherever that is installed, as for a hub checkpoint.
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": TILES_PER_EDGE * image_size},
        max_image_size={"longest_edge": image_size},
    )
    patches_per_side = image_size // vision.patch_size
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(model_max_length=text.max_position_embeddings),
        # <image> tokens per tile: the encoder's patches after the connector's pixel shuffle.
        image_seq_len=patches_per_side**2 // config.scale_factor**2,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(out_dir: str | Path, *, arch: str = "tiny", seed: int = 0) -> Path:
    """Writes a checkpoint of arch with random weights to out_dir that the Auto* classes load; returns out_dir."""
    config = arch_config(arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(config)
    if processor.tokenizer.convert_tokens_to_ids("<image>") != config.image_token_id:
        raise RuntimeError("the tokenizer's <image> id does not match the model config")
    processor.save_pretrained(out)

    # float32 keeps the tiny model exact on CPU; the real-sized ones are built straight in bfloat16,
    # as on the hub, so the 2B one never needs its float32 copy (~9 GB) in memory.
    dtype = torch.float32 if arch == "tiny" else torch.bfloat16
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID
    )
    model.save_pretrained(out)
    return out
