// Placeholder replaced by the sentencepiece module implementation.
extern "C" int speed_spm_abi_version() { return 1; }
