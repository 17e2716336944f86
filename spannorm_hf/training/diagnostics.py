"""Per-block signal-propagation statistics: the quantities SpanNorm's theory is about.

Everything goes through public hooks: forward hooks on the decoder blocks (`model.base_model.layers`) and the
parameters' `.grad`; nothing here reaches into a block's internals, so it works for every norm scheme.
"""

import torch
from torch import nn


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a SpanNorm (or Llama-style) model, also under a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model.layers


class BlockStats:
    """Context manager recording, for every block, the RMS of its output and the cosine similarity between
    its input and output (a PreNorm block whose cosine nears 1 has collapsed to the identity).

    Values are means over tokens of the last forward pass run inside the `with`.
    """

    def __init__(self, model: nn.Module):
        self.blocks = decoder_blocks(model)
        self.output_rms: list[float] = [float("nan")] * len(self.blocks)
        self.cosine: list[float] = [float("nan")] * len(self.blocks)
        self._handles: list = []

    def _hook(self, index: int):
        @torch.no_grad()
        def hook(module, args, kwargs, output):
            x_in = (args[0] if args else kwargs["hidden_states"]).float()
            x_out = (output[0] if isinstance(output, tuple) else output).float()
            self.output_rms[index] = x_out.pow(2).mean(-1).sqrt().mean().item()
            self.cosine[index] = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).mean().item()

        return hook

    def __enter__(self) -> "BlockStats":
        self._handles = [
            block.register_forward_hook(self._hook(i), with_kwargs=True) for i, block in enumerate(self.blocks)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def block_grad_norms(model: nn.Module) -> list[float]:
    """L2 norm of each block's parameter gradients (call after backward, before zero_grad)."""
    norms = []
    for block in decoder_blocks(model):
        squares = [p.grad.float().pow(2).sum() for p in block.parameters() if p.grad is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros(())
        if hasattr(total, "full_tensor"):  # DTensor under FSDP2
            total = total.full_tensor()
        norms.append(total.sqrt().item())
    return norms
