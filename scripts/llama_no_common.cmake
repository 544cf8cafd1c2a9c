# Included by llama.cpp's CMakeLists.txt right after its project() call (scripts/install.sh passes
# -DCMAKE_PROJECT_llama.cpp_INCLUDE=<a copy of this file>). llama-cpp-python forces llama.cpp's `common` library on
# (a FORCE'd cache entry set before it adds llama.cpp), but its Python bindings load only libllama and the ggml
# libraries: `common` and the HTTP code it pulls in were about half of the compile (issue 33: install time).
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp common library (not loaded by the Python bindings)" FORCE)
