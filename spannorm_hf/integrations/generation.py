"""Text generation from a SpanNorm checkpoint or LoRA adapter folder: greedy, sampling or beam search over a batch
of prompts, or streamed to the terminal with `TextStreamer`.

Everything goes through `model.generate` and `GenerationConfig`; this module only checks the settings early and
names the bad one, pads batches on the left, and picks the model loader (checkpoint or adapter). A prompt that is
empty, or that with `max_new_tokens` would run past the model's context (`max_position_embeddings`, the positions
it was trained on), is refused rather than cut: cutting would silently drop what the user wrote. Every setting is
bounded and checked before the model loads (`check_generation_settings`, `check_device`); `--prompts-file` is read
through `cli.read_text`, bounded at PROMPTS_LIMIT.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from ..cli import MAX_SEED, ArgumentParser, InputError, check_range, command, read_text
from .adapters import is_adapter_folder, load_adapter
from .hub import load_checkpoint
from .prompts import format_prompt

MODES = ("greedy", "sample", "beam")
MAX_BEAMS = 64  # each beam is a copy of the sequence and its cache: memory grows with it
PROMPTS_LIMIT = 16 << 20  # every prompt of the file is generated in one batch
PROMPTS_BIGGER = "split it into several files and run once for each"


def check_device(device: str | None) -> str:
    """`--device`, checked before any work: a device type torch knows, present on this machine, with that index;
    None means CUDA when available, else the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device name: use cpu, cuda, cuda:1, mps, ...") from None
    if kind.type == "cpu":
        return device
    present = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if present is None or present.type != kind.type:
        has = f"cpu and {present.type}" if present is not None else "only cpu"
        raise InputError(
            f"--device {device!r}: this machine has no {kind.type} device (it has {has}); pick one of those"
        )
    count = torch.accelerator.device_count()
    if kind.index is not None and kind.index >= count:
        raise InputError(
            f"--device {device!r}: this machine has {count} {kind.type} device(s), numbered from {kind.type}:0"
        )
    return device


def load_model(
    name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "auto", device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A SpanNorm checkpoint (folder or Hub id) or a LoRA adapter folder on its base, in eval mode on `device`
    (default: CUDA when available)."""
    device = check_device(device)
    if is_adapter_folder(name_or_path):
        model, tokenizer = load_adapter(name_or_path, dtype=dtype)
    else:
        model, tokenizer = load_checkpoint(name_or_path, dtype=dtype)
    return model.to(device).eval(), tokenizer


def check_generation_settings(
    *,
    mode: str = "greedy",
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    num_beams: int | None = None,
    repetition_penalty: float | None = None,
) -> None:
    """`InputError` naming the first bad setting: out of its range, or one that `mode` would ignore (an error
    rather than silently dropped). Needs no model, so the CLI checks before loading one."""
    if mode not in MODES:
        raise InputError(f"mode={mode!r} must be one of {MODES}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if mode != "sample":
        for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
            if value is not None:
                raise InputError(f"{name}={value} only applies to mode='sample' (mode is {mode!r})")
    if mode != "beam" and num_beams is not None:
        raise InputError(f"num_beams={num_beams} only applies to mode='beam' (mode is {mode!r})")
    if temperature is not None and temperature <= 0:
        raise InputError(f"temperature={temperature} must be > 0 (use mode='greedy' for argmax decoding)")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p={top_p} must be in (0, 1]")
    if top_k is not None and top_k < 0:
        raise InputError(f"top_k={top_k} must be >= 0 (0 disables it)")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise InputError(f"repetition_penalty={repetition_penalty} must be > 0 (1.0 is no penalty)")
    if num_beams is not None and not 2 <= num_beams <= MAX_BEAMS:
        raise InputError(
            f"num_beams={num_beams} must be in [2, {MAX_BEAMS}] for beam search (each beam holds a copy of the "
            "sequence and its cache)"
        )


def generation_config(
    model: PreTrainedModel,
    *,
    mode: str = "greedy",
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    num_beams: int | None = None,
    repetition_penalty: float | None = None,
) -> GenerationConfig:
    """The model's own generation config (bos/eos/pad) updated for `mode`, after `check_generation_settings`."""
    check_generation_settings(
        mode=mode,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
    )
    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    settings: dict = {"max_new_tokens": max_new_tokens, "do_sample": mode == "sample", "num_beams": 1}
    if mode == "sample":
        settings.update(temperature=temperature or 1.0, top_p=top_p or 1.0, top_k=50 if top_k is None else top_k)
    if mode == "beam":
        settings.update(num_beams=num_beams or 4, early_stopping=True)
    if repetition_penalty is not None:
        settings["repetition_penalty"] = repetition_penalty
    config.update(**settings)
    return config


def check_prompt_lengths(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_new_tokens: int
) -> None:
    """Raise `InputError` for a prompt with no tokens (nothing to continue from) or one whose tokens plus
    `max_new_tokens` exceed the model's context: past `max_position_embeddings` the model meets positions it never
    trained on, so the prompt is refused rather than silently cut."""
    context = model.config.max_position_embeddings
    for number, ids in enumerate(tokenizer(list(texts), add_special_tokens=True)["input_ids"], start=1):
        if not ids:
            raise InputError(f"prompt {number} is empty: there is nothing to continue from; give some text")
        if len(ids) + max_new_tokens > context:
            raise InputError(
                f"prompt {number} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(ids) + max_new_tokens}, more than the model's context of {context} tokens "
                "(max_position_embeddings); shorten the prompt or lower --max-new-tokens"
            )


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: GenerationConfig,
    *,
    stream: bool = False,
    chat: bool = False,
) -> list[str]:
    """The continuation of each prompt (prompt text not repeated). `chat` formats prompts the way fine-tuning
    formatted instruction data. `stream` prints tokens to stdout as they come, one prompt after another
    (TextStreamer handles one sequence, so not with beam search)."""
    if not prompts:
        raise InputError("no prompts given")
    if stream and config.num_beams > 1:
        raise InputError("streaming shows one sequence as it grows; it cannot be combined with beam search")
    texts = [format_prompt(tokenizer, p) for p in prompts] if chat else list(prompts)
    check_prompt_lengths(model, tokenizer, texts, config.max_new_tokens)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    device = next(model.parameters()).device
    if stream:
        outputs = []
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        for prompt, text in zip(prompts, texts, strict=True):
            print(prompt, end="", flush=True)
            inputs = tokenizer(text, return_tensors="pt").to(device)
            with torch.no_grad():
                ids = model.generate(**inputs, generation_config=config, streamer=streamer)
            outputs.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        return outputs
    inputs = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        ids = model.generate(**inputs, generation_config=config)
    return tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass
class GenerateArguments:
    """The options of `spannorm-generate`; settings that depend on `mode` are checked by `generation_config`."""

    model: str = field(metadata={"help": "checkpoint folder, Hub id, or LoRA adapter folder"})
    prompt: list[str] = field(
        default_factory=list,
        metadata={"help": "a prompt; several for a batch (--prompt A --prompt B, or --prompt A B)", "action": "extend"},
    )
    prompts_file: str | None = field(default=None, metadata={"help": "a text file with one prompt per line"})
    mode: str = field(default="greedy", metadata={"help": "decoding strategy", "choices": MODES})
    max_new_tokens: int = field(
        default=64, metadata={"help": "tokens to generate; prompt tokens + this must fit the context"}
    )
    temperature: float | None = field(
        default=None, metadata={"help": "sampling temperature (mode sample; default 1.0)"}
    )
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling mass (mode sample; default 1.0)"})
    top_k: int | None = field(
        default=None, metadata={"help": "sample from the k most likely tokens (mode sample; default 50)"}
    )
    num_beams: int | None = field(default=None, metadata={"help": f"beams, 2 to {MAX_BEAMS} (mode beam; default 4)"})
    repetition_penalty: float | None = field(
        default=None,
        metadata={"help": "penalty on tokens already in the sequence (1.0: none; > 1 discourages repeats)"},
    )
    stream: bool = field(default=False, metadata={"help": "print tokens as they are generated (not with beam)"})
    chat: bool = field(
        default=False,
        metadata={
            "help": "each prompt is a user turn of the tokenizer's chat template (as fine-tuning formats "
            "instruction data)"
        },
    )
    seed: int = field(default=0, metadata={"help": f"random seed of sampling, 0 to {MAX_SEED}"})
    dtype: str = field(
        default="auto", metadata={"help": "weights dtype", "choices": ["auto", "float32", "bfloat16", "float16"]}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda when available)"})

    def __post_init__(self):
        check_generation_settings(
            mode=self.mode,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
        )
        check_range("--seed", self.seed, 0, MAX_SEED)
        check_device(self.device)


def parser() -> ArgumentParser:
    """The parser of `spannorm-generate`, built from `GenerateArguments`."""
    return ArgumentParser(
        GenerateArguments,
        description="Generate text with a SpanNorm checkpoint (folder or Hub id) or adapter. A prompt must have at "
        "least one token, and its tokens plus --max-new-tokens must fit the model's context (max_position_embeddings):"
        " a longer prompt is an error, never silently cut.",
    )


@command
def main(argv: Sequence[str] | None = None) -> int:
    """`spannorm-generate` / `scripts/generate.py`: 0 on success, 2 (one `error:` line) for bad input."""
    (args,) = parser().parse_args_into_dataclasses(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        text = read_text(args.prompts_file, flag="--prompts-file", limit=PROMPTS_LIMIT, bigger=PROMPTS_BIGGER)
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError("give at least one --prompt or a --prompts-file")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    config = generation_config(
        model,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
    )
    torch.manual_seed(args.seed)  # sampling uses torch's RNG; transformers.set_seed would import PEFT and the Trainer
    outputs = generate(model, tokenizer, prompts, config, stream=args.stream, chat=args.chat)
    if not args.stream:
        for prompt, output in zip(prompts, outputs, strict=True):
            print(f"{prompt}{output}")
            if len(prompts) > 1:
                print("-" * 40)
    return 0
