#!/usr/bin/env bash
# The virtual environment benchmarks/norm_fusion.py runs in: normswap (editable) and llm-compressor in one
# process, so both fold the same models in the same run. Kept apart from the development environment.
#
#     bash benchmarks/norm_fusion_env.sh        # creates benchmarks/.venv-llmc (2-3 minutes here, 6 GB)
#
# llmcompressor 0.14.0.1 pins torch<=2.14.0 and transformers<=5.17.0, older than the torch 2.14.1 and
# transformers 5.x normswap is developed against; installed with its dependencies it would replace both. So
# llmcompressor and compressed-tensors go in with --no-deps, plus only what
# `from llmcompressor.modeling.fuse import fuse_norm_linears` imports (llmcompressor's package __init__ pulls
# in loguru, psutil, datasets, requests and accelerate). auto-round and nvidia-ml-py, which it also lists, are
# not needed for that import and are left out; `pip check` names them and the two pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-benchmarks/.venv-llmc}
LLMC_VERSION=${LLMC_VERSION:-0.14.0.1}
CT_VERSION=${CT_VERSION:-0.19.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install torch
"$PIP" install -e ".[transformers]"
"$PIP" install --no-deps "llmcompressor==$LLMC_VERSION" "compressed-tensors==$CT_VERSION"
"$PIP" install loguru psutil datasets requests accelerate
"$VENV/bin/python" -c "import torch, transformers, llmcompressor, normswap
from llmcompressor.modeling.fuse import fuse_norm_linears
print('$VENV: torch', torch.__version__, 'transformers', transformers.__version__,
      'llmcompressor', llmcompressor.__version__, 'normswap', normswap.__version__)" 2>/dev/null | tail -1
