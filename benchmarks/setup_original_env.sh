#!/usr/bin/env bash
# A venv with the original OmniGen/DiTFuse code's transformers 4.45-era pins, for
# benchmarks/vs_original.py, train_step.py --original-python and official_parity.py. It reuses the
# system torch/numpy/PIL (--system-site-packages) and pins only what the original's APIs need;
# it is never a dependency of this project.
#
#   benchmarks/setup_original_env.sh [VENV_DIR] [DITFUSE_SRC_DIR]
#
# VENV_DIR defaults to /tmp/venv45. DITFUSE_SRC_DIR (optional): where to put the original sources
# (github.com/Henry-Lee-real/DiTFuse: its OmniGen/ folder and test.py), cloned if git can reach it.
set -euo pipefail
venv="${1:-/tmp/venv45}"
src="${2:-}"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install --no-deps transformers==4.45.2 peft==0.13.2 "tokenizers<0.21" \
    huggingface-hub==0.25.2 diffusers==0.30.3
"$venv/bin/python" -c "import transformers, peft, diffusers; print('original env:', transformers.__version__, peft.__version__, diffusers.__version__)"
if [[ -n "$src" && ! -d "$src/OmniGen" ]]; then
    git clone --depth 1 https://github.com/Henry-Lee-real/DiTFuse "$src"
fi
echo "use: --original-python $venv/bin/python${src:+ --original-src $src}"
