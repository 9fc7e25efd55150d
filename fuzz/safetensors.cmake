# Fuzz target of the safetensors + checkpoint modules; included by fuzz/CMakeLists.txt.
add_executable(fuzz_safetensors ${CMAKE_CURRENT_LIST_DIR}/fuzz_safetensors.cc)
target_link_libraries(fuzz_safetensors PRIVATE speed_checkpoint)
target_compile_options(fuzz_safetensors PRIVATE -fsanitize=fuzzer,address,undefined)
target_link_options(fuzz_safetensors PRIVATE -fsanitize=fuzzer,address,undefined)
