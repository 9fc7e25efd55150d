// speed-erase launcher: a small executable, free of LibTorch, that sets the OpenMP wait policy
// and picks malloc's page size, then executes the real program, speed-erase-cli (the
// subcommands, libspeed and LibTorch). Both settings are read once, when the program starts, so
// only a process that runs before it can choose them for its users.
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
// Page size for malloc. glibc.malloc.hugetlb=1 (glibc >= 2.35; older versions ignore it) makes
// malloc ask for transparent huge pages (MADV_HUGEPAGE) where the kernel's THP mode is "madvise".
// Which page size is cheaper depends on the machine, since a run's ~300 MB of fresh anonymous
// memory is paid for on first touch: on the sixth and seventh sessions' virtual machine a 4 KiB
// page fault cost ~13 us, 512 of them 6.7 ms against ~4.3 ms for one fresh 2 MiB huge page, and
// huge pages made a cold celebrity-100 run 0.5-1.0 s faster; on the ninth session's machine a 4 KiB
// fault costs 1-3 us and the same fresh huge page 4.4-5.6 ms (the host backs it on first touch),
// and huge pages made the run 0.2-0.6 s slower (docs/performance.md). So the launcher times 512
// first-touch 4 KiB faults (2 MiB, ~1 ms here; the cheaper of two tries) and adds the tunable when
// they cost more than a fresh huge page does on either machine (8 us each). It passes the figure on
// as SPEED_ERASE_PAGE_FAULT_US (the report's page_fault_us); a value already set there is used
// instead of timing. A GLIBC_TUNABLES that names glibc.malloc.hugetlb is the user's choice and is
// kept as it is, with no timing.
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
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

constexpr double kHugePagesAboveUs = 8.0;

// Microseconds per first-touch 4 KiB page fault: the 512 pages of a fresh 2 MiB anonymous mapping
// kept out of huge pages, touched one by one; the cheaper of two tries (a preemption inflates
// one). Negative when it cannot be measured.
double page_fault_us() {
  constexpr std::size_t kPage = 4096, kBytes = std::size_t{2} << 20;
  double best = -1;
  for (int attempt = 0; attempt < 2; ++attempt) {
    void* m = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return -1;
    ::madvise(m, kBytes, MADV_NOHUGEPAGE);
    auto* p = static_cast<volatile char*>(m);
    timespec a{}, b{};
    ::clock_gettime(CLOCK_MONOTONIC, &a);
    for (std::size_t i = 0; i < kBytes; i += kPage) p[i] = 1;
    ::clock_gettime(CLOCK_MONOTONIC, &b);
    ::munmap(m, kBytes);
    const double us = (static_cast<double>(b.tv_sec - a.tv_sec) * 1e6 +
                       static_cast<double>(b.tv_nsec - a.tv_nsec) / 1e3) /
                      static_cast<double>(kBytes / kPage);
    if (best < 0 || us < best) best = us;
  }
  return best;
}

void choose_malloc_pages() {
  static constexpr char kHugetlb[] = "glibc.malloc.hugetlb";
  const char* current = std::getenv("GLIBC_TUNABLES");
  if (current != nullptr && std::strstr(current, kHugetlb) != nullptr) return;  // the user's choice
  double us = -1;
  const char* given = std::getenv("SPEED_ERASE_PAGE_FAULT_US");
  if (given != nullptr && *given != '\0') {
    char* end = nullptr;
    us = std::strtod(given, &end);
    if (end == given || *end != '\0') us = -1;
  } else {
    us = page_fault_us();
    if (us < 0) return;  // not measurable (no memory to map): glibc's default
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f", us);
    ::setenv("SPEED_ERASE_PAGE_FAULT_US", buf, 1);
  }
  if (!(us > kHugePagesAboveUs)) return;
  const std::string tunable = std::string(kHugetlb) + "=1";
  ::setenv("GLIBC_TUNABLES",
           current == nullptr || *current == '\0' ? tunable.c_str()
                                                  : (std::string(current) + ":" + tunable).c_str(),
           1);
}

}  // namespace

int main(int /*argc*/, char** argv) {
  // Overwrite = 0: a policy the user chose is kept (and libgomp's GOMP_SPINCOUNT, if set, still
  // takes precedence over the policy).
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
  choose_malloc_pages();

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
