// speed-erase launcher: a small executable, free of LibTorch, that loads the CLI module
// (libspeed_cli.so: the subcommands, libspeed and LibTorch) and runs it.
//
// Why a separate executable: libgomp, which LibTorch's CPU kernels use, reads OMP_WAIT_POLICY
// once, when it is loaded. Linked into the executable it is loaded before main() runs, so the
// program could not choose the policy for itself. With the variable unset, libgomp's idle
// threads spin, and on a 2-core machine they take CPU from the encoder and the edit (about
// 0.4-0.5 s of CPU on a cold celebrity-100 run; docs/performance.md). The launcher sets
// OMP_WAIT_POLICY=PASSIVE unless the user set it, and only then loads the module.
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

bool is_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string exe_dir() {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return {};
  const std::string path(buf, static_cast<std::size_t>(n));
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

// $SPEED_ERASE_CLI_MODULE, else beside the executable (build tree), else the install location.
std::vector<std::string> candidates() {
  if (const char* env = std::getenv("SPEED_ERASE_CLI_MODULE"); env && *env) return {env};
  std::vector<std::string> c;
  const std::string dir = exe_dir();
  if (!dir.empty()) c.push_back(dir + "/libspeed_cli.so");
#ifdef SPEED_CLI_INSTALL_PATH
  c.emplace_back(SPEED_CLI_INSTALL_PATH);
#endif
  if (!dir.empty()) c.push_back(dir + "/../lib/speed-erase/libspeed_cli.so");
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  // Overwrite = 0: a policy the user chose is kept (and libgomp's GOMP_SPINCOUNT, if set, still
  // takes precedence over the policy).
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 0);

  std::string tried;
  for (const std::string& path : candidates()) {
    if (!is_file(path)) {
      tried += (tried.empty() ? "'" : ", '") + path + "'";
      continue;
    }
    void* lib = ::dlopen(path.c_str(), RTLD_LAZY | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* why = ::dlerror();
      std::fprintf(stderr, "error: cannot load the speed-erase CLI module '%s': %s\n", path.c_str(),
                   why ? why : "unknown dlopen error");
      std::fprintf(stderr, "hint: reinstall speed-erase, or rebuild it (scripts/setup.sh)\n");
      return 1;
    }
    using Main = int (*)(int, char**);
    auto run = reinterpret_cast<Main>(::dlsym(lib, "speed_cli_main"));
    if (run == nullptr) {
      std::fprintf(stderr, "error: '%s' is not a speed-erase CLI module (no speed_cli_main)\n",
                   path.c_str());
      return 1;
    }
    return run(argc, argv);
  }
  std::fprintf(stderr, "error: the speed-erase CLI module libspeed_cli.so was not found (tried %s)\n",
               tried.c_str());
  std::fprintf(stderr, "hint: reinstall speed-erase, or set $SPEED_ERASE_CLI_MODULE to its path\n");
  return 1;
}
