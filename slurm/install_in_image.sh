#!/bin/bash
# Install megatron-pwdpo into an NGC PyTorch image (nvcr.io/nvidia/pytorch:25.04-py3 or
# newer) without touching what the image was built with: torch, Transformer Engine,
# apex, NCCL/CUDA wheels, numpy, triton, flash-attn keep their versions. See README,
# "Installing on a cluster". Run inside the image (Dockerfile RUN, or `enroot start
# --rw`), with the repository at $1:
#
#   bash slurm/install_in_image.sh /opt/megatron-pwdpo
#
# - megatron-core is installed with --no-deps (its requirements, torch, numpy and
#   packaging, are the image's);
# - the package's pure-Python requirements and the [hf] extra (read from pyproject.toml)
#   are installed constrained to the image's versions of the packages above, so pip can
#   neither upgrade nor replace them;
# - the package itself with --no-deps;
# - Transformer Engine must be >= 2.2 (megatron-core 0.16 builds the examples'
#   `tensorwise` FP8 recipe only from 2.2 on): an older image is refused.
set -euo pipefail
SRC=$(cd "${1:?usage: install_in_image.sh REPO_DIR}" && pwd)
PYTHON=${PYTHON:-python}
MEGATRON_CORE=${MEGATRON_CORE:-megatron-core==0.16.1}

# NGC images pin every installed package through PIP_CONSTRAINT; the constraints below
# keep the ones that matter and let the new pure-Python packages in.
unset PIP_CONSTRAINT

"$PYTHON" - <<'EOF'
import sys

from packaging.version import Version

try:
    import transformer_engine
except ImportError:
    sys.exit("install_in_image.sh: no Transformer Engine in this image (use an NGC PyTorch image)")
version = Version(transformer_engine.__version__.split("+")[0])
if version < Version("2.2"):
    sys.exit(
        f"install_in_image.sh: Transformer Engine {version} < 2.2: megatron-core builds the "
        "examples' tensorwise FP8 recipe only on TE >= 2.2; use nvcr.io/nvidia/pytorch:25.04-py3 "
        "or newer"
    )
print(f"install_in_image.sh: Transformer Engine {version}")
EOF

keep=$(mktemp)
"$PYTHON" -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|transformer[-_]engine[a-z0-9_-]*|apex|numpy|triton|flash[-_]attn|nvidia-[a-z0-9-]+|pytorch-triton)==' \
  > "$keep" || true
echo "install_in_image.sh: kept at the image's versions: $(tr '\n' ' ' < "$keep")"

requirements=$(mktemp)
"$PYTHON" - "$SRC/pyproject.toml" > "$requirements" <<'EOF'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
skip = {"torch", "megatron-core"}  # the image's torch; megatron-core below, --no-deps
for req in [*project["dependencies"], *project["optional-dependencies"]["hf"]]:
    name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")
    if name not in skip:
        print(req)
EOF

"$PYTHON" -m pip install --no-cache-dir --no-deps "$MEGATRON_CORE"
"$PYTHON" -m pip install --no-cache-dir -c "$keep" -r "$requirements"
"$PYTHON" -m pip install --no-cache-dir --no-deps "$SRC"
"$PYTHON" -m pip check || echo "install_in_image.sh: pip check reports the above (the image's own pins)"
"$PYTHON" -c "import megatron.core, megatron_pwdpo, transformer_engine, transformers; print('install_in_image.sh: ok')"
rm -f "$keep" "$requirements"
