# Fuzz targets of the tokenizer module; include() from fuzz/CMakeLists.txt (clang, SPEED_FUZZ=ON).
foreach(target fuzz_tokenizer_text fuzz_tokenizer_file)
  add_executable(${target} ${CMAKE_CURRENT_LIST_DIR}/${target}.cc)
  target_link_libraries(${target} PRIVATE speed_tokenizer)
  target_compile_options(${target} PRIVATE -fsanitize=fuzzer,address,undefined)
  target_link_options(${target} PRIVATE -fsanitize=fuzzer,address,undefined)
endforeach()
