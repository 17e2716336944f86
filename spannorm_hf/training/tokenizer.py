"""Byte-level BPE tokenizers trained from local text, saved as `PreTrainedTokenizerFast`.

No hub at run time: a user (or a test) trains a tokenizer on their own text in seconds. Special tokens take
ids 0, 1, 2 (pad, bos, eos), which are `SpanNormConfig`'s defaults for bos/eos, then 3, 4 for the chat role
markers.

Chat format (`CHAT_TEMPLATE`, ChatML-style role markers): every message is `<|im_start|>ROLE\\nCONTENT<|im_end|>`;
an assistant message is followed by EOS (`<|endoftext|>`), the token generation already stops on, so
`pipeline`, TRL and OpenAI-style servers stop at the end of the assistant's turn with the model's own generation
config. The generation prompt is `<|im_start|>assistant\\n`. The assistant's content, `<|im_end|>` and EOS sit
inside `{% generation %}` markers, so TRL's `assistant_only_loss` trains the model to stop.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' + eos_token }}{%- endgeneration -%}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (any iterable of strings, e.g. lines or documents); it carries the chat
    template above, so chat clients work with a model trained on it."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )
