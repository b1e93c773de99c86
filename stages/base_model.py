"""The embedded default base model: a tiny, randomly initialised Qwen2.5-VL (or Qwen2-VL), built offline.

    python -m stages.base_model --config recipes/tiny.yaml
    python -m stages.base_model --config recipes/tiny.yaml --family qwen2_vl --output_dir checkpoints/tiny/base-qwen2-vl

The tokenizer is a byte-level BPE trained on the sample corpus with Qwen2's normaliser and
pre-tokeniser, the Qwen chat special tokens, and Qwen2.5-VL's chat template (as TRL ships it), so
every stage treats this model exactly like a real Qwen2.5-VL checkpoint, only much smaller. The
folder it writes is a normal HF model folder: `AutoModelForImageTextToText.from_pretrained` and
`AutoProcessor.from_pretrained` load it with no other files.
"""

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.artifacts import atomic_directory, check_output_dir
from common.errors import UsageError, run_cli
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
CORPUS_SUFFIXES = (".md", ".txt")


@dataclass
class BaseModelArguments:
    output_dir: str = field(default="checkpoints/tiny/base", metadata={"help": "Folder to write the model to."})
    family: Literal["qwen2_5_vl", "qwen2_vl"] = field(default="qwen2_5_vl", metadata={"help": "Model family."})
    tokenizer_corpus: list[str] = field(
        default_factory=lambda: ["samples/udhr"],
        metadata={"help": "Text files (.md, .txt) or folders of them to train the tokenizer on."},
    )
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size, special tokens included."})
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    vision_intermediate_size: int = 64
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
                "whole multiple of 8 (the multimodal rotary embedding splits head_dim / 2 into 3 sections)."
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
        if self.vocab_size < 256 + len(QWEN_SPECIAL_TOKENS):
            raise UsageError(f"vocab_size ({self.vocab_size}) must be at least 270: 256 bytes + 14 special tokens.")
        if self.embedding_rows and self.embedding_rows < self.vocab_size:
            raise UsageError(
                f"embedding_rows ({self.embedding_rows}) must be 0 or at least vocab_size ({self.vocab_size})."
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


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with Qwen2's normaliser (NFC), pre-tokeniser and special tokens, trained on `texts`."""
    from transformers import Qwen2Tokenizer

    template = Qwen2Tokenizer()  # empty vocabulary: used only for its normaliser/pre-tokeniser/decoder
    tokenizer = template.train_new_from_iterator(
        texts, vocab_size=vocab_size, new_special_tokens=list(QWEN_SPECIAL_TOKENS), show_progress=False
    )
    # as in Qwen2.5-VL-*-Instruct: a turn ends with <|im_end|>, padding uses <|endoftext|>
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = qwen_vl_chat_template()
    return tokenizer


def qwen_vl_chat_template() -> str:
    """Qwen2.5-VL's chat template, byte for byte as TRL stores it (TRL recognises the model by it)."""
    # found without importing trl, which would import deepspeed and probe for accelerators
    trl_folder = Path(importlib.util.find_spec("trl").origin).parent
    return (trl_folder / "chat_templates" / "qwen2_5_vl.jinja").read_text(encoding="utf-8")


def build_processor(tokenizer, args: BaseModelArguments):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    processor_class = Qwen2_5_VLProcessor if args.family == "qwen2_5_vl" else Qwen2VLProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )


def build_config(tokenizer, args: BaseModelArguments):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    head_dim = args.hidden_size // args.num_attention_heads
    half = head_dim // 2
    # temporal / height / width sections of the multimodal rotary embedding; Qwen2.5-VL-3B uses 16/24/24 of 64
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text_config = dict(
        vocab_size=max(len(tokenizer), args.embedding_rows),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=args.tie_word_embeddings,
    )
    special_ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    if args.family == "qwen2_5_vl":
        vision_config = dict(
            depth=args.vision_depth,
            hidden_size=args.vision_hidden_size,
            intermediate_size=args.vision_intermediate_size,
            num_heads=args.vision_num_heads,
            out_hidden_size=args.hidden_size,
            # every 8th block attends globally, the rest within windows, as in Qwen2.5-VL ([7, 15, 23, 31] of 32)
            fullatt_block_indexes=[i for i in range(7, args.vision_depth, 8)] or [args.vision_depth - 1],
        )
        return Qwen2_5_VLConfig(
            text_config=text_config,
            vision_config=vision_config,
            tie_word_embeddings=args.tie_word_embeddings,
            **special_ids,
        )
    vision_config = dict(
        depth=args.vision_depth,
        embed_dim=args.vision_hidden_size,
        hidden_size=args.hidden_size,
        mlp_ratio=args.vision_intermediate_size // args.vision_hidden_size,
        num_heads=args.vision_num_heads,
    )
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=args.tie_word_embeddings,
        **special_ids,
    )


def build_tiny_base_model(args: BaseModelArguments, seed: int):
    """Return (model, processor), deterministic for `seed`."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    texts = [path.read_text(encoding="utf-8") for path in args.corpus_files()]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    processor = build_processor(tokenizer, args)
    config = build_config(tokenizer, args)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, args.dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[config.text_config.eos_token_id, config.text_config.bos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model, processor


def main(argv: list[str] | None = None) -> None:
    recipe_args, args = parse_stage_arguments("base_model", (BaseModelArguments,), argv)
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
