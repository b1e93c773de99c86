"""The embedded default base model: a tiny, randomly initialised VLM of one of the backbone families
(Qwen2.5-VL by default; Qwen2-VL, Qwen3-VL, Gemma 3), built offline.

    python -m stages.base_model --config recipes/tiny.yaml
    python -m stages.base_model --config recipes/tiny.yaml --family gemma3 --output_dir checkpoints/tiny/base-gemma3

The tokenizer is a BPE trained on the sample corpus with the family's own tokenizer class (normaliser,
pre-tokeniser, special tokens) and the family's chat template as TRL ships it, so every stage treats this
model exactly like a real checkpoint of the family, only much smaller. The folder it writes is a normal
HF model folder: `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` load it
with no other files.
"""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from common.artifacts import atomic_directory, check_output_dir
from common.errors import UsageError, run_cli
from common.output import set_up_output
from common.recipe import parse_stage_arguments
from common.run_record import write_run_record

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5-Omni's: the chat tokens, and audio, image and video placeholders under its own names
OMNI_SPECIAL_TOKENS = {
    "<|endoftext|>": None,
    "<|im_start|>": None,
    "<|im_end|>": None,
    "<|AUDIO|>": "audio_token",
    "<|audio_bos|>": "audio_bos_token",
    "<|audio_eos|>": "audio_eos_token",
    "<|IMAGE|>": "image_token",
    "<|VIDEO|>": "video_token",
    "<|vision_bos|>": "vision_bos_token",
    "<|vision_eos|>": "vision_eos_token",
}
# Qwen2.5-Omni's chat template (TRL ships none): a system turn unless one is given, then each content item in
# order, audio, images and videos as their placeholders between begin and end tokens
OMNI_CHAT_TEMPLATE = """\
{%- for message in messages -%}
{%- if loop.first and message['role'] != 'system' -%}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string -%}
{{ message['content'] }}
{%- else -%}
{%- for content in message['content'] -%}
{%- if content['type'] == 'audio' -%}<|audio_bos|><|AUDIO|><|audio_eos|>
{%- elif content['type'] == 'image' -%}<|vision_bos|><|IMAGE|><|vision_eos|>
{%- elif content['type'] == 'video' -%}<|vision_bos|><|VIDEO|><|vision_eos|>
{%- elif content['type'] == 'text' -%}{{ content['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""
# Gemma's tokenizer class brings <pad> <eos> <bos> <unk> <mask>; these are the chat and image tokens of Gemma 3
GEMMA3_SPECIAL_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
CORPUS_SUFFIXES = (".md", ".txt")
# the tiny Gemma 3 reads every image as one 224-px square of 14-px patches, pooled to 8 x 8 tokens
# (the real one: 896 px, 64 x 64 patches pooled to 16 x 16 = 256 tokens)
GEMMA3_IMAGE_SIZE, GEMMA3_PATCH_SIZE, GEMMA3_IMAGE_TOKENS = 224, 14, 64


@dataclass
class BaseModelArguments:
    # the values each numeric field can take (common.recipe.check_ranges, before anything loads)
    RANGES: ClassVar[dict[str, str]] = {
        "vocab_size": "[1, inf)",
        "hidden_size": "[1, inf)",
        "num_hidden_layers": "[1, inf)",
        "num_attention_heads": "[1, inf)",
        "num_key_value_heads": "[1, inf)",
        "intermediate_size": "[1, inf)",
        "vision_depth": "[1, inf)",
        "vision_hidden_size": "[1, inf)",
        "vision_num_heads": "[1, inf)",
        "vision_intermediate_size": "[1, inf)",
        "embedding_rows": "[0, inf)",
        "min_pixels": "[1, inf)",
        "max_pixels": "[1, inf)",
    }

    output_dir: str = field(default="checkpoints/tiny/base", metadata={"help": "Folder to write the model to."})
    family: Literal["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "gemma3", "qwen2_5_omni"] = field(
        default="qwen2_5_vl", metadata={"help": "Model family (lco/families.py)."}
    )
    tokenizer_corpus: list[str] = field(
        default_factory=lambda: ["samples/udhr"],
        metadata={"help": "Text files (.md, .txt) or folders of them to train the tokenizer on."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size, special tokens included."})
    hidden_size: int = field(default=64, metadata={"help": "Language model width (a multiple of its heads)."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Language model layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Language model attention heads."})
    num_key_value_heads: int = field(
        default=2, metadata={"help": "Language model key/value heads (grouped-query attention; divides the heads)."}
    )
    intermediate_size: int = field(default=128, metadata={"help": "Language model MLP width."})
    vision_depth: int = field(default=2, metadata={"help": "Vision tower layers."})
    vision_hidden_size: int = field(default=32, metadata={"help": "Vision tower width (a multiple of its heads)."})
    vision_num_heads: int = field(default=2, metadata={"help": "Vision tower attention heads."})
    vision_intermediate_size: int = field(default=64, metadata={"help": "Vision tower MLP width."})
    rope_theta: float = field(
        default=0.0,
        metadata={
            "help": "Base of the language model's rotary embedding (0: the family's, 1e6 for Qwen2-VL/Qwen2.5-VL, 5e6 "
            "for Qwen3-VL). Qwen2.5-VL gives an image's columns the lowest frequencies of each head: at 1e6 and "
            "head_dim 64 the next column turns a key by under 2e-4 rad, so a tiny model cannot tell which glyph "
            "of a line comes first; 10 lets it (bench/results/toy_search_cpu2.md)."
        },
    )
    embedding_rows: int = field(
        default=0,
        metadata={
            "help": "Rows of the embedding matrix, at least the vocabulary (0: the vocabulary). "
            "Qwen2.5-VL pads to 151936."
        },
    )
    tie_word_embeddings: bool = field(
        default=False, metadata={"help": "Share the input and output embeddings (Qwen2.5-VL-3B does)."}
    )
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "Dtype of the saved weights."})
    min_pixels: int = field(default=56 * 56, metadata={"help": "Smallest image the processor keeps, in pixels."})
    max_pixels: int = field(
        default=448 * 448, metadata={"help": "Image pixel budget: 448*448 px = 256 visual tokens after 2x2 merging."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def validate(self) -> None:
        self.corpus_files()
        head_dim, remainder = divmod(self.hidden_size, self.num_attention_heads)
        if remainder or head_dim % 8:
            raise UsageError(
                f"hidden_size ({self.hidden_size}) / num_attention_heads ({self.num_attention_heads}) must be a "
                "whole multiple of 8 (the Qwen families' multimodal rotary embedding splits head_dim / 2 into 3 "
                "sections; Gemma 3's rotary embedding needs an even head_dim)."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.vision_hidden_size % self.vision_num_heads:
            raise UsageError(
                f"vision_hidden_size ({self.vision_hidden_size}) must be a multiple of vision_num_heads "
                f"({self.vision_num_heads})."
            )
        smallest = 256 + len(special_tokens(self.family))
        if self.vocab_size < smallest:
            raise UsageError(
                f"vocab_size ({self.vocab_size}) must be at least {smallest} for {self.family}: "
                "256 bytes + its special tokens."
            )
        if self.embedding_rows and self.embedding_rows < self.vocab_size:
            raise UsageError(
                f"embedding_rows ({self.embedding_rows}) must be 0 or at least vocab_size ({self.vocab_size})."
            )
        if self.rope_theta and (self.rope_theta <= 1 or self.family == "gemma3"):
            raise UsageError(
                f"rope_theta ({self.rope_theta}) must be 0 (the family's) or above 1, and is set for the Qwen "
                "families only."
            )
        if not 0 < self.min_pixels <= self.max_pixels:
            raise UsageError(f"need 0 < min_pixels ({self.min_pixels}) <= max_pixels ({self.max_pixels}).")
        check_output_dir(self.output_dir, overwrite=self.overwrite)

    def corpus_files(self) -> list[Path]:
        files = []
        for entry in map(Path, self.tokenizer_corpus):
            if not entry.exists():
                raise UsageError(f"tokenizer_corpus: {entry} does not exist; give text files or folders of them.")
            found = sorted(p for p in entry.rglob("*") if p.suffix in CORPUS_SUFFIXES) if entry.is_dir() else [entry]
            if not found:
                raise UsageError(f"tokenizer_corpus: {entry} holds no {' or '.join(CORPUS_SUFFIXES)} files.")
            files.extend(found)
        return files


def special_tokens(family: str) -> tuple[str, ...]:
    return (
        GEMMA3_SPECIAL_TOKENS + ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
        if family == "gemma3"
        else tuple(OMNI_SPECIAL_TOKENS)
        if family == "qwen2_5_omni"
        else QWEN_SPECIAL_TOKENS
    )


def train_tokenizer(texts: list[str], vocab_size: int, family: str = "qwen2_5_vl"):
    """A BPE trained on `texts` with the family's tokenizer class (normaliser, pre-tokeniser, decoder) and
    special tokens, its chat template, and the end-of-turn token as end of sequence, as in its instruct models."""
    if family == "gemma3":
        from transformers import GemmaTokenizer

        trained = GemmaTokenizer().train_new_from_iterator(
            texts, vocab_size=vocab_size, new_special_tokens=list(GEMMA3_SPECIAL_TOKENS), show_progress=False
        )
        # Gemma3Processor finds its image tokens under these names, as in the real tokenizer's config
        image_tokens = {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        }
        tokenizer = GemmaTokenizer(tokenizer_object=trained.backend_tokenizer, extra_special_tokens=image_tokens)
        tokenizer.eos_token = "<end_of_turn>"
    elif family == "qwen2_5_omni":
        from transformers import Qwen2Tokenizer

        trained = Qwen2Tokenizer().train_new_from_iterator(
            texts, vocab_size=vocab_size, new_special_tokens=list(OMNI_SPECIAL_TOKENS), show_progress=False
        )
        # Qwen2_5OmniProcessor finds its placeholders under these names, as in the real tokenizer's config
        named = {name: token for token, name in OMNI_SPECIAL_TOKENS.items() if name}
        tokenizer = Qwen2Tokenizer(
            tokenizer_object=trained.backend_tokenizer,
            extra_special_tokens=named,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        )
    else:
        from transformers import Qwen2Tokenizer

        template = Qwen2Tokenizer()  # empty vocabulary: used only for its normaliser/pre-tokeniser/decoder
        tokenizer = template.train_new_from_iterator(
            texts, vocab_size=vocab_size, new_special_tokens=list(QWEN_SPECIAL_TOKENS), show_progress=False
        )
        # as in Qwen2.5-VL-*-Instruct: a turn ends with <|im_end|>, padding uses <|endoftext|>
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.pad_token = "<|endoftext|>"
    trl_name = {"qwen2_vl": "qwen2_5_vl", "qwen2_5_omni": None}.get(family, family)
    tokenizer.chat_template = trl_chat_template(trl_name) if trl_name else OMNI_CHAT_TEMPLATE
    return tokenizer


def trl_chat_template(name: str) -> str:
    """A family's chat template, byte for byte as TRL stores it (TRL recognises the model by it)."""
    # found without importing trl, which would import deepspeed and probe for accelerators
    trl_folder = Path(importlib.util.find_spec("trl").origin).parent
    return (trl_folder / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def build_processor(tokenizer, args: BaseModelArguments):
    from transformers import (
        Gemma3ImageProcessor,
        Gemma3Processor,
        Qwen2_5_VLProcessor,
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    template = tokenizer.chat_template
    if args.family == "qwen2_5_omni":
        return Qwen2_5OmniProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=args.min_pixels, max_pixels=args.max_pixels),
            video_processor=Qwen2VLVideoProcessor(),
            feature_extractor=WhisperFeatureExtractor(feature_size=128),  # 128 mel bins, 16 kHz, as Qwen2.5-Omni's
            tokenizer=tokenizer,
            chat_template=template,
        )
    if args.family == "gemma3":
        image_processor = Gemma3ImageProcessor(size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE})
        return Gemma3Processor(image_processor, tokenizer, template, image_seq_length=GEMMA3_IMAGE_TOKENS)
    if args.family == "qwen3_vl":  # 16-px patches (28 in the earlier Qwen families)
        image_processor = Qwen2VLImageProcessor(
            patch_size=16,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        return Qwen3VLProcessor(image_processor, tokenizer, Qwen3VLVideoProcessor(), chat_template=template)
    image_processor = Qwen2VLImageProcessor(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    processor_class = Qwen2_5_VLProcessor if args.family == "qwen2_5_vl" else Qwen2VLProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )


def build_config(tokenizer, args: BaseModelArguments):
    text_config = dict(
        vocab_size=max(len(tokenizer), args.embedding_rows),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        max_position_embeddings=32768,
        bos_token_id=tokenizer.convert_tokens_to_ids("<bos>" if args.family == "gemma3" else "<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    if args.family == "gemma3":
        return gemma3_config(tokenizer, text_config, args)
    return qwen_config(tokenizer, text_config, args)


def gemma3_config(tokenizer, text_config: dict, args: BaseModelArguments):
    from transformers import Gemma3Config

    head_dim = args.hidden_size // args.num_attention_heads
    layers = args.num_hidden_layers
    # Gemma 3 attends within a sliding window in five of every six layers; the tiny one keeps its last global
    layer_types = [
        "full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention" for i in range(layers)
    ]
    text_config.update(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=512, layer_types=layer_types)
    vision_config = dict(
        hidden_size=args.vision_hidden_size,
        intermediate_size=args.vision_intermediate_size,
        num_hidden_layers=args.vision_depth,
        num_attention_heads=args.vision_num_heads,
        image_size=GEMMA3_IMAGE_SIZE,
        patch_size=GEMMA3_PATCH_SIZE,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        tie_word_embeddings=args.tie_word_embeddings,
    )


def qwen_config(tokenizer, text_config: dict, args: BaseModelArguments):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    head_dim = args.hidden_size // args.num_attention_heads
    half = head_dim // 2
    special_ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    vision_config = dict(
        depth=args.vision_depth,
        hidden_size=args.vision_hidden_size,
        intermediate_size=args.vision_intermediate_size,
        num_heads=args.vision_num_heads,
        out_hidden_size=args.hidden_size,
    )
    if args.family == "qwen3_vl":
        # temporal / height / width sections, interleaved; Qwen3-VL uses 24/20/20 of 64
        spatial = half * 5 // 16
        rope = {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [half - 2 * spatial, spatial, spatial],
        }
        rope["rope_theta"] = args.rope_theta or rope["rope_theta"]
        text_config.update(head_dim=head_dim, rope_parameters={**rope, "mrope_interleaved": True})
        vision_config.update(
            num_position_embeddings=256,  # a 16 x 16 grid of learned positions, interpolated (48 x 48 in Qwen3-VL)
            # features of a middle vision block are added to the first language layer (three blocks in Qwen3-VL)
            deepstack_visual_indexes=[args.vision_depth // 2],
        )
        config_class = Qwen3VLConfig
    else:
        # temporal / height / width sections of the multimodal rotary embedding; Qwen2.5-VL-3B uses 16/24/24 of 64
        mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text_config["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": args.rope_theta or 1e6,
            "mrope_section": mrope_section,
        }
        if args.family == "qwen2_vl":  # Qwen2-VL's tower names its sizes otherwise
            vision_config = dict(
                depth=args.vision_depth,
                embed_dim=args.vision_hidden_size,
                hidden_size=args.hidden_size,
                mlp_ratio=args.vision_intermediate_size // args.vision_hidden_size,
                num_heads=args.vision_num_heads,
            )
            config_class = Qwen2VLConfig
        else:
            # every 8th block attends globally, the rest within windows, as in Qwen2.5-VL ([7, 15, 23, 31] of 32)
            vision_config["fullatt_block_indexes"] = [i for i in range(7, args.vision_depth, 8)] or [
                args.vision_depth - 1
            ]
            if args.family == "qwen2_5_omni":
                return omni_thinker_config(tokenizer, text_config, vision_config, args)
            config_class = Qwen2_5_VLConfig
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=args.tie_word_embeddings,
        **special_ids,
    )


def omni_thinker_config(tokenizer, text_config: dict, vision_config: dict, args: BaseModelArguments):
    """Qwen2.5-Omni's thinker (the part that reads text, images, audio and video and writes text): Qwen2.5-VL's
    vision tower and a Whisper-style audio encoder in front of the language model."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    audio_config = dict(
        num_mel_bins=128,
        encoder_layers=args.vision_depth,
        encoder_attention_heads=args.vision_num_heads,
        encoder_ffn_dim=args.vision_intermediate_size,
        d_model=args.vision_hidden_size,
        output_dim=args.hidden_size,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5OmniThinkerConfig(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        audio_token_index=ids("<|AUDIO|>"),
        image_token_index=ids("<|IMAGE|>"),
        video_token_index=ids("<|VIDEO|>"),
        audio_start_token_id=ids("<|audio_bos|>"),
        audio_end_token_id=ids("<|audio_eos|>"),
        user_token_id=ids(tokenizer.tokenize("user")[0]),
        tie_word_embeddings=args.tie_word_embeddings,
    )
    # read by its multimodal rotary positions, though not among the config's arguments (the real config.json has them)
    config.vision_start_token_id, config.vision_end_token_id = ids("<|vision_bos|>"), ids("<|vision_eos|>")
    return config


def build_tiny_base_model(args: BaseModelArguments, seed: int):
    """Return (model, processor), deterministic for `seed`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    texts = [path.read_text(encoding="utf-8") for path in args.corpus_files()]
    tokenizer = train_tokenizer(texts, args.vocab_size, args.family)
    processor = build_processor(tokenizer, args)
    config = build_config(tokenizer, args)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, args.dtype))
    model.generation_config = GenerationConfig(
        # the end of a turn or of the text, whichever comes first
        eos_token_id=[
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids("<eos>" if args.family == "gemma3" else "<|endoftext|>"),
        ],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model, processor


def main(argv: list[str] | None = None) -> None:
    recipe_args, args = parse_stage_arguments("base_model", (BaseModelArguments,), argv)
    set_up_output(recipe_args.verbose)
    model, processor = build_tiny_base_model(args, recipe_args.seed)
    n_parameters = sum(p.numel() for p in model.parameters())
    with atomic_directory(args.output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_run_record(
            tmp,
            stage="base_model",
            config={"recipe": vars(recipe_args), "base_model": vars(args)},
            seed=recipe_args.seed,
            inputs=args.corpus_files(),
            results={"parameters": n_parameters},
        )
    print(
        f"wrote a randomly initialised {args.family} model ({n_parameters:,} parameters, vocabulary "
        f"{len(processor.tokenizer)}) to {args.output_dir}"
    )


if __name__ == "__main__":
    run_cli(main)
