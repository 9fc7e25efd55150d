// safetensors writers: header form, byte-identical no-op rewrite, replace/drop/append, atomic
// temp + rename (failure leaves nothing, signals clean up), refusing to overwrite the input.
#include <dirent.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include <catch2/catch.hpp>

#include "speed/error.h"
#include "speed/safetensors.h"

using speed::Dtype;
using speed::SafeTensors;
using speed::TensorData;
using Catch::Matchers::Contains;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/speed-st-XXXXXX";
    REQUIRE(::mkdtemp(t) != nullptr);
    path = t;
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    DIR* d = ::opendir(path.c_str());
    while (dirent* e = ::readdir(d)) {
      if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) out.emplace_back(e->d_name);
    }
    ::closedir(d);
    return out;
  }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

void copy(const std::string& from, const std::string& to) {
  std::ofstream out(to, std::ios::binary);
  out << slurp(from);
}

const std::string kFixture = std::string(SPEED_SHARED_DIR) + "/golden/fixture_tiny_f32.safetensors";
const std::string kKey = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";

}  // namespace

TEST_CASE("writer: header form and round trip", "[unit]") {
  TempDir dir;
  std::vector<float> a{1, 2, 3, 4};
  std::vector<std::int64_t> b{7};
  std::vector<TensorData> ts{{"a", Dtype::F32, {2, 2}, a.data(), 16}, {"b.ids", Dtype::I64, {1}, b.data(), 8}};
  const speed::Metadata md{{"format", "pt"}, {"note", "é \"quoted\""}};
  std::string h = speed::make_header(ts, md);
  CHECK(h.substr(0, 16) == "{\"__metadata__\":");
  CHECK(h.size() % 8 == 0);
  CHECK(h.find(R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})") != std::string::npos);
  CHECK(h.find(R"("b.ids":{"dtype":"I64","shape":[1],"data_offsets":[16,24]})") != std::string::npos);
  CHECK(speed::make_header({}, {}) == "{}      ");

  speed::write_safetensors(dir / "x.safetensors", ts, md);
  auto st = SafeTensors::open(dir / "x.safetensors");
  CHECK(st.header_json() == h);
  CHECK(st.metadata() == md);
  REQUIRE(st.tensors().size() == 2);
  CHECK(std::memcmp(st.data(st.at("a")), a.data(), 16) == 0);
  CHECK(std::memcmp(st.data(st.at("b.ids")), b.data(), 8) == 0);
  CHECK(dir.entries() == std::vector<std::string>{"x.safetensors"});
  struct stat sb {};
  REQUIRE(::stat((dir / "x.safetensors").c_str(), &sb) == 0);
  CHECK((sb.st_mode & 0777) != 0600);  // not mkstemp's private mode

  REQUIRE_THROWS_WITH(speed::write_safetensors(dir / "x.safetensors", ts, md), Contains("already exists"));
  speed::write_safetensors(dir / "x.safetensors", {ts[0]}, {}, /*overwrite=*/true);
  CHECK(SafeTensors::open(dir / "x.safetensors").tensors().size() == 1);

  REQUIRE_THROWS_WITH(speed::write_safetensors(dir / "y.safetensors", {{"a", Dtype::F32, {2, 2}, a.data(), 12}}, {}),
                      Contains("tensor 'a' has 12 bytes of data, expected 16 (shape [2, 2] x F32)"));
  REQUIRE_THROWS_WITH(speed::write_safetensors(dir / "y.safetensors", {ts[0], ts[0]}, {}), Contains("duplicate tensor name 'a'"));
  REQUIRE_THROWS_WITH(speed::write_safetensors(dir / "y.safetensors", {{"__metadata__", Dtype::F32, {2, 2}, a.data(), 16}}, {}),
                      Contains("'__metadata__' cannot be a tensor name"));
  REQUIRE_THROWS_WITH(speed::write_safetensors("/dev/null", ts, {}, true), Contains("exists and is not a regular file"));
  REQUIRE_THROWS_WITH(speed::write_safetensors(dir / "missing/z.safetensors", ts, {}),
                      Contains("cannot create a temporary file in '" + dir.path + "/missing'"));
  CHECK(dir.entries() == std::vector<std::string>{"x.safetensors"});
  CHECK(speed::pending_temp_files() == 0);
}

TEST_CASE("writer: a failed write (file size limit, like ENOSPC) leaves nothing", "[unit]") {
  TempDir dir;
  std::vector<std::uint8_t> big(1 << 20, 0xab);
  std::vector<TensorData> ts{{"big", Dtype::U8, {1 << 20}, big.data(), big.size()}};
  // RLIMIT_FSIZE makes write() fail with EFBIG past 64 KiB, as a full disk fails with ENOSPC.
  struct rlimit old {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old;
  lim.rlim_cur = 64 * 1024;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
  std::string message;
  try {
    speed::write_safetensors(dir / "out.safetensors", ts, {});
  } catch (const speed::Error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  CAPTURE(message);
  CHECK_THAT(message, Contains("cannot write '" + dir / "out.safetensors" + "'"));
  CHECK_THAT(message, Contains("File too large"));
  CHECK(dir.entries().empty());
  CHECK(speed::pending_temp_files() == 0);
}

TEST_CASE("writer: streaming writer checks the byte count", "[unit]") {
  TempDir dir;
  std::vector<float> a{1, 2, 3, 4};
  {
    speed::SafetensorsWriter w(dir / "s.safetensors", {{"a", Dtype::F32, {4}, nullptr, 0}}, {});
    CHECK(w.expected_data_bytes() == 16);
    CHECK(speed::pending_temp_files() == 1);
    w.write(a.data(), 8);
    REQUIRE_THROWS_WITH(w.write(a.data(), 16), Contains("writing 16 more bytes than the header declares (8 of 16 written)"));
    REQUIRE_THROWS_WITH(w.commit(), Contains("tensor data is 8 bytes, the header declares 16"));
  }
  CHECK(dir.entries().empty());  // the uncommitted writer removed its temp file
  CHECK(speed::pending_temp_files() == 0);
  speed::SafetensorsWriter w(dir / "s.safetensors", {{"a", Dtype::F32, {4}, nullptr, 0}}, {});
  w.write(a.data(), 8);
  w.write(a.data() + 2, 8);
  w.commit();
  CHECK(SafeTensors::open(dir / "s.safetensors").at("a").nbytes() == 16);
}

TEST_CASE("rewrite: no-op is byte-identical, replace/drop/append, never the input", "[unit][golden]") {
  TempDir dir;
  copy(kFixture, dir / "in.safetensors");
  const std::string original = slurp(dir / "in.safetensors");
  auto src = SafeTensors::open(dir / "in.safetensors");

  speed::rewrite_safetensors(src, dir / "noop.safetensors", {});
  CHECK(slurp(dir / "noop.safetensors") == original);

  // Replace one K/V tensor: same header bytes, only that tensor's bytes differ.
  const auto& k = src.at(kKey);
  std::vector<float> w(static_cast<std::size_t>(k.numel()));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(i) * 0.5f;
  speed::RewriteOptions rep;
  rep.replace[kKey] = {kKey, Dtype::F32, k.shape, w.data(), w.size() * 4};
  speed::rewrite_safetensors(src, dir / "rep.safetensors", rep);
  auto out = SafeTensors::open(dir / "rep.safetensors");
  CHECK(out.header_json() == src.header_json());
  CHECK(std::memcmp(out.data(out.at(kKey)), w.data(), w.size() * 4) == 0);
  std::size_t identical = 0;
  for (const auto& t : src.tensors()) {
    if (t.name == kKey) continue;
    const auto& o = out.at(t.name);
    REQUIRE(o.nbytes() == t.nbytes());
    identical += std::memcmp(out.data(o), src.data(t), t.nbytes()) == 0 ? 1 : 0;
  }
  CHECK(identical == src.tensors().size() - 1);

  // Drop, append and new metadata: a regenerated canonical header, source order kept.
  speed::RewriteOptions edit;
  edit.drop = {"model_ema.decay"};
  std::vector<double> extra{1.5};
  edit.append = {{"speed.extra", Dtype::F64, {1}, extra.data(), 8}};
  edit.set_metadata = {{"seed", "changed"}, {"speed.report", "{\"ok\":true}"}};
  edit.remove_metadata = {"fixture"};
  speed::rewrite_safetensors(src, dir / "edit.safetensors", edit);
  auto e = SafeTensors::open(dir / "edit.safetensors");
  CHECK(e.header_json().substr(0, 16) == "{\"__metadata__\":");
  CHECK(e.header_size() % 8 == 0);
  CHECK(e.metadata_value("fixture") == nullptr);
  REQUIRE(e.metadata_value("seed") != nullptr);
  CHECK(*e.metadata_value("seed") == "changed");
  CHECK(e.metadata().back().first == "speed.report");
  CHECK(e.metadata().front().first == "format");
  CHECK(!e.contains("model_ema.decay"));
  REQUIRE(e.tensors().size() == src.tensors().size());
  CHECK(e.tensors().back().name == "speed.extra");
  std::size_t j = 0;
  for (const auto& t : src.tensors()) {
    if (t.name == "model_ema.decay") continue;
    CHECK(e.tensors()[j].name == t.name);
    CHECK(std::memcmp(e.data(e.tensors()[j]), src.data(t), t.nbytes()) == 0);
    ++j;
  }

  // Wrong replacements.
  speed::RewriteOptions bad;
  bad.replace[kKey] = {kKey, Dtype::F16, k.shape, w.data(), w.size() * 2};
  REQUIRE_THROWS_WITH(speed::rewrite_safetensors(src, dir / "bad.safetensors", bad),
                      Contains("replacement for tensor '" + kKey + "' has dtype F16, expected F32"));
  bad.replace[kKey] = {kKey, Dtype::F32, {k.shape[1], k.shape[0]}, w.data(), w.size() * 4};
  REQUIRE_THROWS_WITH(speed::rewrite_safetensors(src, dir / "bad.safetensors", bad),
                      Contains("has shape [128, 32], expected [32, 128]"));
  speed::RewriteOptions unknown;
  unknown.drop = {"no.such.tensor"};
  REQUIRE_THROWS_WITH(speed::rewrite_safetensors(src, dir / "bad.safetensors", unknown),
                      Contains("cannot drop tensor 'no.such.tensor'"));

  // The input itself, under any spelling or a hard link, is refused even with overwrite.
  speed::RewriteOptions force;
  force.overwrite = true;
  REQUIRE_THROWS_WITH(speed::rewrite_safetensors(src, dir / "in.safetensors", force), Contains("is the input file"));
  REQUIRE_THROWS_WITH(speed::rewrite_safetensors(src, dir.path + "/./in.safetensors", force), Contains("is the input file"));
  REQUIRE(::link((dir / "in.safetensors").c_str(), (dir / "link.safetensors").c_str()) == 0);
  REQUIRE_THROWS_WITH(speed::rewrite_safetensors(src, dir / "link.safetensors", force), Contains("is the input file"));
  CHECK(slurp(dir / "in.safetensors") == original);
  for (const auto& name : dir.entries()) CHECK(name.find(".tmp-") == std::string::npos);
}

TEST_CASE("writer: SIGTERM during a write removes the temp file", "[unit]") {
  TempDir dir;
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    speed::install_cleanup_signal_handlers();
    speed::SafetensorsWriter w(dir / "sig.safetensors", {{"a", Dtype::U8, {4}, nullptr, 0}}, {});
    w.write("ab", 2);
    ::raise(SIGTERM);
    ::_exit(3);  // not reached: the handler re-raises with the default action
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGTERM);
  CHECK(dir.entries().empty());
}
