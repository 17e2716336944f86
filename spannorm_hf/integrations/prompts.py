"""How an instruction prompt is shown to the model: fine-tuning trains on it, generation (`--chat`) starts from it,
so both take it from here."""

from transformers import PreTrainedTokenizerBase

# Instruction format for tokenizers without a chat template (ours have one, see training.tokenizer).
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model sees it: the chat template's user turn + generation prompt, else PROMPT_TEMPLATE."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PROMPT_TEMPLATE.format(prompt=prompt)
