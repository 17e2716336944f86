#!/usr/bin/env bash
# GPU check for a lent H200 (issue 6): bf16 training steps of the 1B preset, SpanNorm
# vs transformers' Llama at the same shapes, FlashAttention (flash-attn if importable, else SDPA's flash backend;
# the output says which), MFU from counted FLOPs, peak memory, decode tokens/s, static-cache compiled generate.
# It exits within 8 minutes (a hard `timeout` below; the Python side skips its optional part past 420 s).
#
# Three ways to run it:
#   bash benchmarks/gpu_check.sh --fetch-wheels   HERE, where PyPI answers: downloads what the device image lacks into
#                                              .whl/ (git-ignored via .git/info/exclude, about 14 MiB) for `carry`.
#   bash benchmarks/gpu_check.sh                  ON THE DEVICE, through the session's device tool, e.g.
#                                                run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#                                              Results: stdout, and $OUT/gpu_check.md + $OUT/gpu_check.json.
#   bash benchmarks/gpu_check.sh --dry-run        anywhere, on CPU: the same steps at the tiny preset (a few minutes on
#                                              2 busy cores), so the script
#                                              is known to work before a GPU is lent.
#
# Why wheels: the device image has its own torch 2.11 (fine: the project needs torch>=2.9) and transformers 5.17,
# older than the 5.24 this project is written against (its attention/experts/output-capturing APIs), and it
# cannot reach PyPI. Its huggingface_hub 1.33, tokenizers 0.23, safetensors 0.8 and accelerate 1.15 satisfy
# transformers 5.24, so that one pure-Python wheel is carried (plus regex, which 5.24 wants at >= 2025.10.22).
# The spannorm_hf package itself travels with the working tree and is put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
TRANSFORMERS_VERSION=5.24.0
REGEX_VERSION=2026.11.19
WHEELS=${WHEEL_DIR:-.whl}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    if [[ "$WHEELS" == ".whl" ]] && ! grep -qxF "/.whl/" .git/info/exclude 2>/dev/null; then
        mkdir -p .git/info && echo "/.whl/" >>.git/info/exclude
    fi
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "transformers==$TRANSFORMERS_VERSION" "regex==$REGEX_VERSION"
    ls -la "$WHEELS"
    exit 0
fi

# Versions first: say what this machine has before spending device time on it.
python3 - <<'EOF'
import sys, importlib.metadata as md
have = {n: (md.version(n) if any(True for _ in md.distributions(name=n)) else "missing")
        for n in ("torch", "transformers", "huggingface_hub", "tokenizers", "safetensors", "regex", "flash-attn")}
print("python", sys.version.split()[0], "|", " ".join(f"{k} {v}" for k, v in have.items()), flush=True)
EOF
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo "installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers; print('using torch', torch.__version__, '| transformers', \
transformers.__version__, '| cuda', torch.cuda.is_available())"
exec timeout 470 python3 benchmarks/gpu_check.py "$@"
