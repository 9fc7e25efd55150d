/* libspeed_unused.so: the empty library that speed-erase-cli's loader finds in place of the
 * shared libraries LibTorch's dependencies name but the program never uses (OpenCV, FFmpeg,
 * LevelDB, ...). scripts/unused-libs.sh decides which, and links each of their names to this
 * file in the folder the program's DT_RPATH names. It defines no exported symbol and has no
 * constructor; the one object below only keeps the translation unit from being empty. */
__attribute__((visibility("hidden"))) const char speed_unused_library[] =
    "speed-erase: stands in for a library the program does not use (scripts/unused-libs.sh)";
