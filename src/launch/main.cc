// speed-erase launcher: a small executable, free of LibTorch, that sets the OpenMP wait policy,
// then executes the real program, speed-erase-cli (the subcommands, libspeed and LibTorch). The
// policy is read once, when the program starts, so only a process that runs before it can choose
// it for its users.
//
// Why a separate executable: libgomp, which LibTorch's CPU kernels use, reads OMP_WAIT_POLICY
// once, in its initialiser. Linked into the executable it is initialised before main() runs, and
// glibc points `environ` at the original block only after the executable's .preinit_array, so
// the program cannot choose the policy for itself. With the variable unset, libgomp's idle
// threads spin, and on a 2-core machine they take CPU from the encoder and the edit (about
// 0.4-0.5 s of CPU on a cold celebrity-100 run; docs/performance.md). The launcher sets
// OMP_WAIT_POLICY=PASSIVE unless the user set it, then replaces itself with speed-erase-cli
// (execv: same process id, arguments, standard streams and exit status; ~1 ms). Executing
// speed-erase-cli itself again instead would map and relocate LibTorch twice (+0.27 s measured);
// loading it as a module with dlopen made LeakSanitizer's exit-time scan crash on the modules'
// dynamic TLS in sanitizer builds.
//
// GLIBC_TUNABLES is left as the user set it. From the sixth to the eighth session the launcher
// added glibc.malloc.hugetlb=1 (transparent huge pages for malloc): 0.5-1.0 s faster on that
// session's machine, where 4 KiB page faults were dear. On the ninth session's machine a fresh
// 2 MiB page costs 4-5 times what 512 fresh 4 KiB pages cost (the host backs it on first touch),
// and the same runs were 0.2-0.6 s faster without it, cold and warm (docs/performance.md, ninth
// session). Which page size is cheaper depends on the host, so the default is glibc's own; a user
// whose machine favours huge pages sets GLIBC_TUNABLES=glibc.malloc.hugetlb=1.
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// $SPEED_ERASE_CLI, else beside the launcher (build tree), else the install location (relative
// to the launcher, then the configured prefix).
std::vector<std::string> candidates() {
  if (const char* env = std::getenv("SPEED_ERASE_CLI"); env && *env) return {env};
  std::vector<std::string> c;
  const std::string dir = exe_dir();
  if (!dir.empty()) c.push_back(dir + "/speed-erase-cli");
  if (!dir.empty()) c.push_back(dir + "/../lib/speed-erase/speed-erase-cli");
#ifdef SPEED_CLI_INSTALL_PATH
  c.emplace_back(SPEED_CLI_INSTALL_PATH);
#endif
  return c;
}

}  // namespace

int main(int /*argc*/, char** argv) {
  // Overwrite = 0: a policy the user chose is kept (and libgomp's GOMP_SPINCOUNT, if set, still
  // takes precedence over the policy).
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 0);

  std::string tried;
  for (const std::string& path : candidates()) {
    if (!is_file(path)) {
      tried += (tried.empty() ? "'" : ", '") + path + "'";
      continue;
    }
    ::execv(path.c_str(), argv);  // returns only on failure
    const int err = errno;
    std::fprintf(stderr, "error: cannot execute the speed-erase program '%s': %s\n", path.c_str(),
                 std::strerror(err));
    std::fprintf(stderr, "hint: reinstall speed-erase, or rebuild it (scripts/setup.sh)\n");
    return 1;
  }
  std::fprintf(stderr, "error: the speed-erase program speed-erase-cli was not found (tried %s)\n",
               tried.c_str());
  std::fprintf(stderr, "hint: reinstall speed-erase, or set $SPEED_ERASE_CLI to its path\n");
  return 1;
}
