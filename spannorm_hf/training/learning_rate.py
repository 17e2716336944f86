"""The learning rate `spannorm-train` uses without `--lr`: the one the project's studies measured for the config.

Both studies are in experiments/norm_comparison (byte-level LMs, 200 steps of 16 x 64 bytes, AdamW (0.9, 0.95),
weight decay 0.1, 10% warmup then cosine, clipping at 1):
- depth (results/depth): SpanNorm with CompleteP's skip scale `a = 2L`, the default, keeps its best learning rate
  from L = 6 to 48 at width 128, so depth needs no correction;
- width (results/width): with `mup_base_width=128` the best stays at width 128's from width 64 to 512; without a
  width rule it halves per doubling of the width, as the standard parametrization predicts.
So a config acts like the plain model at width `b` (its `mup_base_width` with the width rule, its `hidden_size`
without), and its learning rate is BASE_LR * BASE_WIDTH / b. Other schemes and skip scales were not measured across
widths: they get FALLBACK_LR and a note to tune it. The studies' horizon is 200 steps of a byte-level model: a longer
run, a larger batch or another tokenizer can move the best a x2 step either way (the README's demo: one step up).
"""

from ..configuration_spannorm import SpanNormConfig

BASE_WIDTH = 128  # the width both studies tuned at
BASE_LR = 8e-3  # span + CompleteP's best at width 128 in the width study, at L = 6 and at L = 12
FALLBACK_LR = 2e-3  # the trainer's default before the studies; measured for no particular model


def predicted_lr(config: SpanNormConfig) -> tuple[float, str]:
    """(learning rate, where it comes from) for `config`, as `spannorm-train` prints it."""
    if config.norm_scheme != "span" or config.residual_rule != "completep":
        return FALLBACK_LR, (
            f"the pre-study default: no study measured norm_scheme={config.norm_scheme!r} with "
            f"residual_scale={config.residual_rule!r} across widths, so tune it"
        )
    if config.mup_base_width is not None:
        base, how = config.mup_base_width, f"with the width rule (mup_base_width={config.mup_base_width})"
    else:
        base, how = config.hidden_size, f"without a width rule, at hidden_size={config.hidden_size}"
    lr = BASE_LR * BASE_WIDTH / base
    rule = f"{BASE_LR:g} x {BASE_WIDTH} / {base}"
    return lr, f"the width and depth studies' rule for span with CompleteP's skip scale, {how}: {rule}"
