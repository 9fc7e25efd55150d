// SpmTokenizer: loads libspeed_spm_impl.so into its own link namespace (dlmopen LM_ID_NEWLM)
// and calls its C ABI. The module is loaded once per process and never unloaded (glibc allows
// only a handful of namespaces, and unloading buys nothing).
#include "speed/spm.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <fstream>
#include <mutex>

#include "speed/error.h"
#include "speed/log.h"

namespace speed {

namespace {

constexpr std::size_t kMaxModelBytes = 256u << 20;  // T5's spiece.model is 792 kB
constexpr std::size_t kMaxTextBytes = 16u << 20;
constexpr int kAbiVersion = 2;

struct Module {
  int (*abi_version)() = nullptr;
  void* (*load)(const char*, std::size_t, char*, std::size_t) = nullptr;
  int (*info)(void*, std::int32_t*) = nullptr;
  long (*encode)(void*, const char*, std::size_t, std::int32_t*, std::size_t, char*, std::size_t) = nullptr;
  void (*free)(void*) = nullptr;
};

bool file_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string exe_dir() {
  char buf[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return {};
  std::string path(buf, static_cast<std::size_t>(n));
  auto slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

template <typename Fn>
void bind_symbol(void* lib, const char* name, Fn& fn, const std::string& path) {
  void* sym = ::dlsym(lib, name);
  SPEED_CHECK(sym != nullptr, "sentencepiece module '{}' has no symbol '{}'", path, name);
  fn = reinterpret_cast<Fn>(sym);
}

const Module& module() {
  static Module m;
  static std::once_flag once;
  static std::string error, hint;
  std::call_once(once, [] {
    try {
      std::string path = find_spm_module();
      // A private namespace: the module's libsentencepiece/protobuf never meet LibTorch's.
      void* lib = ::dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (lib == nullptr) {
        const char* why = ::dlerror();
        fail("cannot load sentencepiece module '{}': {}", path, why ? why : "unknown error");
      }
      Module loaded;
      bind_symbol(lib, "speed_spm_abi_version", loaded.abi_version, path);
      bind_symbol(lib, "speed_spm_load", loaded.load, path);
      bind_symbol(lib, "speed_spm_info", loaded.info, path);
      bind_symbol(lib, "speed_spm_encode", loaded.encode, path);
      bind_symbol(lib, "speed_spm_free", loaded.free, path);
      SPEED_CHECK(loaded.abi_version() == kAbiVersion, "sentencepiece module '{}' has ABI version {}, expected {}",
                  path, loaded.abi_version(), kAbiVersion);
      log().debug("sentencepiece module: {}", path);
      m = loaded;
    } catch (const Error& e) {
      error = e.what();
      hint = e.hint();
    }
  });
  if (!error.empty()) throw Error(error, hint);
  return m;
}

}  // namespace

struct SpmTokenizer::Impl {
  void* handle = nullptr;
  int vocab = 0, eos = -1, pad = -1, unk = -1;
  std::string label;
  ~Impl() {
    if (handle) module().free(handle);
  }
};

SpmTokenizer::SpmTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SpmTokenizer::SpmTokenizer(SpmTokenizer&&) noexcept = default;
SpmTokenizer& SpmTokenizer::operator=(SpmTokenizer&&) noexcept = default;
SpmTokenizer::~SpmTokenizer() = default;

SpmTokenizer SpmTokenizer::from_bytes(std::string_view bytes, const std::string& label) {
  SPEED_CHECK(!bytes.empty(), "sentencepiece model '{}' is empty", label);
  SPEED_CHECK(bytes.size() <= kMaxModelBytes, "sentencepiece model '{}' is {} bytes, expected at most {}", label,
              bytes.size(), kMaxModelBytes);
  const Module& m = module();
  char err[512] = {0};
  void* handle = m.load(bytes.data(), bytes.size(), err, sizeof err);
  SPEED_CHECK(handle != nullptr, "sentencepiece model '{}' does not load: {}", label, err);
  auto impl = std::make_unique<Impl>();
  impl->handle = handle;
  impl->label = label;
  std::int32_t info[4] = {0, -1, -1, -1};
  SPEED_CHECK(m.info(handle, info) == 0, "sentencepiece model '{}': cannot query its ids", label);
  impl->vocab = info[0];
  impl->eos = info[1];
  impl->pad = info[2];
  impl->unk = info[3];
  SPEED_CHECK(impl->vocab > 0, "sentencepiece model '{}' has no pieces", label);
  SPEED_CHECK(impl->eos >= 0 && impl->eos < impl->vocab,
              "sentencepiece model '{}' has no EOS piece (eos id {}), expected one as T5 has", label, impl->eos);
  return SpmTokenizer(std::move(impl));
}

SpmTokenizer SpmTokenizer::load(const std::string& model_path) {
  std::ifstream f(model_path, std::ios::binary);
  SPEED_CHECK(f.good(), "cannot open sentencepiece model '{}'", model_path);
  f.seekg(0, std::ios::end);
  auto size = static_cast<std::streamoff>(f.tellg());
  SPEED_CHECK(size >= 0, "cannot read sentencepiece model '{}'", model_path);
  SPEED_CHECK(static_cast<std::size_t>(size) <= kMaxModelBytes,
              "sentencepiece model '{}' is {} bytes, expected at most {}", model_path, size, kMaxModelBytes);
  f.seekg(0);
  std::string data(static_cast<std::size_t>(size), '\0');
  f.read(data.data(), size);
  SPEED_CHECK(f.gcount() == size, "cannot read sentencepiece model '{}'", model_path);
  return from_bytes(data, model_path);
}

std::vector<std::int32_t> SpmTokenizer::encode(std::string_view text) const {
  SPEED_CHECK(text.size() <= kMaxTextBytes, "text of {} bytes is too long to tokenize, expected at most {}",
              text.size(), kMaxTextBytes);
  const Module& m = module();
  std::vector<std::int32_t> ids(text.size() + 16);
  char err[512] = {0};
  for (int attempt = 0; attempt < 2; ++attempt) {
    long n = m.encode(impl_->handle, text.data(), text.size(), ids.data(), ids.size(), err, sizeof err);
    SPEED_CHECK(n >= 0, "sentencepiece cannot encode text with '{}': {}", impl_->label, err);
    if (static_cast<std::size_t>(n) <= ids.size()) {
      ids.resize(static_cast<std::size_t>(n));
      return ids;
    }
    ids.resize(static_cast<std::size_t>(n));
  }
  fail("sentencepiece returned an inconsistent id count for '{}'", impl_->label);
}

SpmTokenized SpmTokenizer::tokenize(std::string_view text, int max_length, int pad_id) const {
  SPEED_CHECK(max_length >= 1 && max_length <= 65536, "max length {} is out of range 1..65536", max_length);
  if (pad_id < 0) pad_id = this->pad_id();
  SPEED_CHECK(pad_id < impl_->vocab, "pad id {} is out of range 0..{}", pad_id, impl_->vocab - 1);
  SpmTokenized out;
  std::vector<std::int32_t> content = encode(text);
  // HF T5TokenizerFast(truncation=True): content cut to max_length - 1, then EOS.
  std::size_t keep = static_cast<std::size_t>(max_length - 1);
  out.truncated = content.size() > keep;
  if (out.truncated) content.resize(keep);
  out.ids = std::move(content);
  out.ids.push_back(impl_->eos);
  out.n = static_cast<int>(out.ids.size());
  out.ids.resize(static_cast<std::size_t>(max_length), pad_id);
  return out;
}

int SpmTokenizer::vocab_size() const { return impl_->vocab; }
int SpmTokenizer::eos_id() const { return impl_->eos; }
int SpmTokenizer::pad_id() const { return impl_->pad >= 0 ? impl_->pad : 0; }

bool is_spm_model_path(const std::string& path) {
  return path.size() > 6 && path.compare(path.size() - 6, 6, ".model") == 0;
}

std::string find_spm_module() {
  std::vector<std::string> tried;
  auto consider = [&](const std::string& p) {
    tried.push_back(p);
    return file_exists(p);
  };
  if (const char* env = std::getenv("SPEED_ERASE_SPM_MODULE"); env && *env) {
    SPEED_CHECK(file_exists(env), "sentencepiece module '{}' (from $SPEED_ERASE_SPM_MODULE) does not exist", env);
    return env;
  }
  const std::string dir = exe_dir();
  std::vector<std::string> candidates;
  if (!dir.empty()) candidates.push_back(dir + "/libspeed_spm_impl.so");
#ifdef SPEED_SPM_BUILD_PATH
  candidates.emplace_back(SPEED_SPM_BUILD_PATH);
#endif
#ifdef SPEED_SPM_INSTALL_PATH
  candidates.emplace_back(SPEED_SPM_INSTALL_PATH);
#endif
  if (!dir.empty()) candidates.push_back(dir + "/../lib/speed-erase/libspeed_spm_impl.so");
  for (const auto& c : candidates) {
    if (consider(c)) return c;
  }
  std::string list;
  for (const auto& t : tried) list += (list.empty() ? "'" : ", '") + t + "'";
  fail_hint("build the speed_spm_impl target or set $SPEED_ERASE_SPM_MODULE to libspeed_spm_impl.so",
            "sentencepiece module libspeed_spm_impl.so not found (tried {})", list);
}

}  // namespace speed
