"""Export a model folder for the ecosystem: a sentence-transformers folder, and an mteb encoder.

    python -m stages.export --model checkpoints/km/contrast/final --output checkpoints/km/sentence-transformers

The output loads with `SentenceTransformer(folder)` from built-in modules only (no custom code, no
`trust_remote_code`) and embeds like `lco.embedder.Embedder`: a Transformer module whose chat template
appends the LCO prompt suffix to the user turn and adds the generation prompt, left padding, last-token
pooling, L2 normalisation. The suffix template lives in the module's `processing_kwargs`, not in the
saved processor, so the folder still works unchanged with `Embedder` and `python -m stages.evaluate`.

The embeddings equal Embedder's for texts up to its `max_text_tokens` (650) and images whose longer side
is at most its `image_max_side` (700 px): Embedder cuts longer texts before templating and thumbnails
larger images, sentence-transformers leaves both to the processor. Thumbnail pages with
`lco.embedder.thumbnail` before `encode` to keep them equal. For bfloat16 weights sentence-transformers
pools and normalises in bfloat16, Embedder in float32, so the two agree to about 1e-3.

`LcoEncoder` runs Embedder under mteb: `mteb.evaluate(LcoEncoder("checkpoints/km/contrast/final"), tasks)`.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.artifacts import atomic_directory, check_model_source, check_output_dir
from common.errors import UsageError, run_cli
from common.output import VERBOSE_HELP, set_up_output
from common.run_record import model_fingerprint, parent_run, write_run_record
from lco.embedder import IMAGE_PROMPT, IMAGE_TEXT_PROMPT, TEXT_PROMPT, Embedder, Item, item_messages

# Put before the model's own chat template: turns each user turn into Embedder's content (see `item_messages`): its
# images, then one text item, its texts joined with the prompt Embedder appends. One item, not a prompt item of its
# own, since some templates trim each item (Gemma 3's), which would drop the prompt's leading newline. It renders
# nothing itself; the model's template renders the changed messages.
LCO_TEMPLATE_PREFIX = """
{%- set lco = namespace(messages=[]) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {%- set content = message['content'] if message['content'] is not string
            else [{'type': 'text', 'text': message['content']}] -%}
        {%- set parts = namespace(others=[], text='', image=false) -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {%- set parts.text = parts.text + item['text'] -%}
            {%- else -%}
                {%- set parts.others = parts.others + [item] -%}
                {%- if item['type'] == 'image' -%}{%- set parts.image = true -%}{%- endif -%}
            {%- endif -%}
        {%- endfor -%}
        {%- set prompt = image_text_prompt if parts.image and parts.text
            else image_prompt if parts.image else text_prompt -%}
        {%- set text = [{'type': 'text', 'text': parts.text + prompt}] -%}
        {%- set lco.messages = lco.messages + [{'role': 'user', 'content': parts.others + text}] -%}
    {%- else -%}
        {%- set lco.messages = lco.messages + [message] -%}
    {%- endif -%}
{%- endfor -%}
{%- set messages = lco.messages -%}
"""


def lco_template(model_template: str) -> str:
    """The model's chat template with the LCO prompts added (json.dumps writes them as Jinja string literals)."""
    prompts = {"text_prompt": TEXT_PROMPT, "image_prompt": IMAGE_PROMPT, "image_text_prompt": IMAGE_TEXT_PROMPT}
    defines = "".join(f"{{%- set {name} = {json.dumps(prompt)} -%}}" for name, prompt in prompts.items())
    return defines + LCO_TEMPLATE_PREFIX + model_template


@dataclass
class ExportArguments:
    model: str | None = field(default=None, metadata={"help": "Model folder, e.g. a contrast `final/`."})
    output: str | None = field(default=None, metadata={"help": "Folder for the sentence-transformers model."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def validate(self) -> None:
        check_model_source(self.model, "--model")
        if self.output is None:
            raise UsageError("--output is not set; give a folder for the sentence-transformers model.")
        output = Path(self.output)
        if output.resolve() == Path(self.model).resolve():
            raise UsageError(f"--output {output} is the --model folder; choose another folder.")
        if output.is_dir() and any(output.iterdir()) and not self.overwrite:
            raise UsageError(
                f"--output {output} already exists and is not empty; "
                "pass --overwrite to replace it, or choose another --output."
            )
        # the remaining checks (a file in the way, no write permission); the one above names our only flag
        check_output_dir(output, overwrite=True, flag="--output")


def sentence_transformer(model_dir: str):
    """A SentenceTransformer of built-in modules that embeds like Embedder (see the module docstring)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoProcessor

    template = AutoProcessor.from_pretrained(model_dir).chat_template
    if template is None:
        raise UsageError(f"--model {model_dir} has no chat template; export needs the one Embedder wraps inputs in.")
    transformer = Transformer(
        model_dir,
        processing_kwargs={
            "chat_template": {"chat_template": lco_template(template), "add_generation_prompt": True},
            # the last position must be a real token for every input, as in Embedder
            "text": {"padding_side": "left"},
        },
    )
    check_prompts(transformer)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu", similarity_fn_name="cosine")


def check_prompts(transformer) -> None:
    """Fail unless the module renders text, image and image+text inputs to Embedder's very prompts.

    The prefix only adds a content item, so a template that puts separators between items would differ."""
    from PIL import Image

    image = Image.new("RGB", (28, 28))
    processor, kwargs = transformer.processor, transformer.processing_kwargs["chat_template"]
    for typed in ({"text": "probe"}, {"image": image}, {"image": image, "text": "probe"}):
        ours = processor.apply_chat_template(transformer.input_formatter.to_message(typed), tokenize=False, **kwargs)
        messages = item_messages(Item(**typed))
        embedder = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if ours != embedder:
            raise UsageError(
                f"--model: its chat template renders {', '.join(typed)} inputs differently with the LCO suffix added "
                f"({ours!r} vs Embedder's {embedder!r}); export supports the families of lco/families.py."
            )


class LcoEncoder:
    """An mteb encoder (`mteb.models.EncoderProtocol`) that embeds with `lco.embedder.Embedder`.

    Not a subclass of mteb's AbsEncoder, so that importing this module (and the export command) does not
    import mteb. Task prompts are not used: the model was trained without instructions. `query_instruction`
    is prefixed to query texts, as `python -m stages.evaluate --query_instruction` does.
    """

    def __init__(
        self,
        model_name: str,
        revision: str | None = None,
        *,
        device: str | None = None,
        query_instruction: str = "",
        **embedder_kwargs,
    ) -> None:
        from mteb.models import ModelMeta
        from mteb.models.model_meta import ScoringFunction

        self.model = Embedder(model_name, device=device, **embedder_kwargs)
        self.query_instruction = query_instruction
        # mteb caches results by name and revision: the weights' fingerprint tells two `final/` folders apart
        self.mteb_model_meta = ModelMeta.create_empty(
            {
                "name": f"local/{Path(model_name).resolve().name}",
                "revision": revision or model_fingerprint(model_name),
                "embed_dim": self.model.model.model.config.text_config.hidden_size,
                "modalities": ["image", "text"],
                "similarity_fn_name": ScoringFunction.COSINE,
                "use_instructions": False,
                "framework": ["PyTorch"],
            }
        )

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """Embed every batch of an mteb DataLoader: `text`, `image` (PIL) or both per input."""
        from mteb.types import PromptType

        chunks = []
        for batch in inputs:
            size = len(batch["text"] if "text" in batch else batch["image"])
            texts = batch.get("text", [""] * size)
            if prompt_type == PromptType.query:
                # not before an empty text: an image query would become an image+text one
                texts = [self.query_instruction + text if text else text for text in texts]
            items = [Item(text, image) for text, image in zip(texts, batch.get("image", [None] * size))]
            chunks.append(self.model.encode(items, batch_size=size))
        return torch.cat(chunks).numpy()

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    try:
        (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # HfArgumentParser's way of reporting unknown flags
        raise UsageError(f"{error}; run with --help to list the flags.") from None
    args.validate()
    set_up_output(args.verbose)
    model = sentence_transformer(args.model)
    dimension = model.get_embedding_dimension()
    with atomic_directory(args.output) as tmp:
        model.save(str(tmp))
        parent = parent_run(args.model)
        # nothing in an export is random: the seed is recorded as 0
        write_run_record(
            tmp, stage="export", config=asdict(args), seed=0, parent=parent, results={"embedding_dimension": dimension}
        )
    print(f"export: wrote a sentence-transformers model ({dimension}-d, last token, normalised) to {args.output}")


if __name__ == "__main__":
    run_cli(main)
