// CLIP tokenizer: golden ids (../shared/golden/tokenizer_cases.json), formats.md §4.8 vectors,
// both file formats, hostile tokenizer files, hostile text, BPE algorithm agreement, speed.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include "../src/tokenizer_internal.h"
#include "speed/error.h"
#include "speed/tokenizer.h"
#include "test_support.h"

namespace {

using speed::test::require_error;

const std::string kShared = SPEED_SHARED_DIR;
const std::string kGz = kShared + "/data/clip/bpe_simple_vocab_16e6.txt.gz";
const std::string kDiffusers = kShared + "/golden/fixture_tiny_diffusers/tokenizer";

const speed::ClipTokenizer& gz_tokenizer() {
  static const speed::ClipTokenizer t = speed::ClipTokenizer::from_merges_file(kGz);
  return t;
}

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string join(const std::vector<std::int32_t>& ids, std::size_t n) {
  std::string s;
  for (std::size_t i = 0; i < n && i < ids.size(); ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s;
}

std::vector<std::int32_t> to_vec(const speed::TokenizedPrompt& p) {
  return {p.ids.begin(), p.ids.end()};
}

// Escapes control characters so failing texts print legibly.
std::string show(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  return out;
}

std::string gunzipped_merges() {
  // The merges text as the loader sees it, via the library's own reader of the .gz.
  static const std::string text = [] {
    std::string cmd = "gzip -dc '" + kGz + "'";
    std::string out;
    FILE* p = popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    char buf[65536];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    pclose(p);
    return out;
  }();
  return text;
}


}  // namespace

TEST_CASE("vocabulary rebuilt from the merges file", "[unit]") {
  const auto& t = gz_tokenizer();
  CHECK(t.vocab_size() == 49408);
  // formats.md §4.1: id 0 = '!', id 256 = '!</w>'; encode() gives content ids only.
  CHECK(t.encode("!") == std::vector<std::int32_t>{256});
  CHECK(t.encode("") .empty());
  auto p = t.tokenize("");
  CHECK(p.n == 2);
  CHECK(p.ids[0] == speed::kSot);
  CHECK(p.ids[1] == speed::kEot);
  CHECK(p.ids[76] == speed::kEot);
  CHECK(p.last_subject() == 0);
}

TEST_CASE("formats.md 4.8 test vectors", "[golden]") {
  const auto& t = gz_tokenizer();
  const std::vector<std::pair<std::string, std::vector<std::int32_t>>> cases = {
      {"a photo of a cat", {49406, 320, 1125, 539, 320, 2368, 49407}},
      {"Van Gogh", {49406, 2451, 19697, 49407}},
      {"a painting in the style of Van Gogh", {49406, 320, 3086, 530, 518, 1844, 539, 2451, 19697, 49407}},
      {"nudity", {49406, 1156, 16436, 49407}},
      {"hello!", {49406, 3306, 256, 49407}},
      {"! !! !!!", {49406, 256, 748, 995, 49407}},
      {"R2-D2 &amp; C-3PO", {49406, 337, 273, 268, 323, 273, 261, 322, 268, 274, 3057, 49407}},
      {"", {49406, 49407}},
  };
  for (const auto& [text, want] : cases) {
    for (int pad : {49407, 0}) {
      auto p = t.tokenize(text, pad);
      std::vector<std::int32_t> full = want;
      full.resize(77, pad);
      INFO("text '" << text << "' pad " << pad << "\n  expected " << join(full, want.size() + 1)
                    << "\n  got      " << join(to_vec(p), want.size() + 1));
      CHECK(to_vec(p) == full);
      CHECK(p.n == static_cast<int>(want.size()));
    }
  }
}

TEST_CASE("golden tokenizer cases", "[golden]") {
  const auto& gz = gz_tokenizer();
  const auto diffusers = speed::ClipTokenizer::from_diffusers_dir(kDiffusers);
  auto doc = nlohmann::json::parse(read_all(kShared + "/golden/tokenizer_cases.json"));
  REQUIRE(doc["cases"].size() == doc["count"].get<std::size_t>());
  int required = 0, required_ok = 0, optional = 0, optional_ok = 0;
  std::string optional_failures;
  for (const auto& c : doc["cases"]) {
    const std::string text = c["text"];
    const auto want = c["ids"].get<std::vector<std::int32_t>>();
    const int want_n = c["n"];
    const bool want_trunc = c["truncated"];
    auto p = gz.tokenize(text);
    bool ok = to_vec(p) == want && p.n == want_n && p.truncated == want_trunc;
    // Both file formats must give the same ids for every case.
    auto q = diffusers.tokenize(text);
    INFO("text '" << show(text) << "': .gz gives " << join(to_vec(p), 77) << "\n  diffusers gives "
                  << join(to_vec(q), 77));
    CHECK(to_vec(q) == to_vec(p));
    CHECK(q.n == p.n);
    if (c["required"].get<bool>()) {
      ++required;
      required_ok += ok;
      INFO("required case '" << show(text) << "' [" << c["category"].get<std::string>() << "]\n  expected n="
                             << want_n << " " << join(want, want_n + 1) << "\n  got      n=" << p.n
                             << " " << join(to_vec(p), want_n + 1));
      CHECK(ok);
    } else {
      ++optional;
      optional_ok += ok;
      if (!ok) {
        optional_failures += "  '" + show(text) + "'\n    expected n=" + std::to_string(want_n) + " " +
                             join(want, want_n) + "\n    got      n=" + std::to_string(p.n) + " " +
                             join(to_vec(p), p.n) + "\n";
      }
    }
  }
  WARN("required cases: " << required_ok << "/" << required << "; non-required cases: " << optional_ok
                          << "/" << optional << " match"
                          << (optional_failures.empty() ? "" : "; mismatches:\n" + optional_failures));
  CHECK(required == doc["required_count"].get<int>());
}

TEST_CASE("edge cases of text", "[unit]") {
  const auto& t = gz_tokenizer();
  SECTION("whitespace only is the empty prompt") {
    for (const char* s : {" ", "\t\n  \r\n", "\xe3\x80\x80", "\xe2\x80\xa8"}) {
      INFO("text '" << show(s) << "'");
      CHECK(t.tokenize(s).n == 2);
    }
  }
  SECTION("literal special tokens count toward n") {
    auto p = t.tokenize("a <|endoftext|> b");
    CHECK(p.n == 5);
    CHECK(p.ids[2] == speed::kEot);
    CHECK(t.tokenize("<|startoftext|>").ids[1] == speed::kSot);
    // Upper case is not split off first, but lower-cases into the pattern's special alternative.
    CHECK(t.tokenize("<|ENDOFTEXT|>").ids[1] == speed::kEot);
  }
  SECTION("truncation keeps 75 content tokens and ends with EOT") {
    std::string s;
    for (int i = 0; i < 100; ++i) s += "cat ";
    auto p = t.tokenize(s, 0);
    CHECK(p.truncated);
    CHECK(p.n == 77);
    CHECK(p.ids[76] == speed::kEot);
    CHECK(p.ids[75] == 2368);
    CHECK(p.last_subject() == 75);
    CHECK(t.encode(s).size() == 100);
    std::string exact;
    for (int i = 0; i < 75; ++i) exact += "cat ";
    CHECK_FALSE(t.tokenize(exact).truncated);
    CHECK(t.tokenize(exact).n == 77);
  }
  SECTION("normalisation") {
    CHECK(speed::ClipTokenizer::normalize("  Hello\t\tWORLD  ") == "hello world");
    CHECK(speed::ClipTokenizer::normalize("\xe2\x80\x9cSmart\xe2\x80\x9d it\xe2\x80\x99s") == "\"smart\" it's");
    CHECK(speed::ClipTokenizer::normalize("\xef\xac\x81ne \xef\xbc\xa1\xef\xbc\xa2") == "fine ab");
    CHECK(speed::ClipTokenizer::normalize("Ben &amp;amp; Jerry") == "ben & jerry");
    CHECK(speed::ClipTokenizer::normalize("<b>&amp;</b>") == "<b>&amp;</b>");
    CHECK(speed::ClipTokenizer::normalize("&#65;&#x42;&#59;") == "ab&#59;");
    CHECK(speed::ClipTokenizer::normalize("\xc4\xb0stanbul") == "i\xcc\x87stanbul");                  // İ
    CHECK(speed::ClipTokenizer::normalize("\xce\xa3\xce\xa3\xce\xa3 \xce\xa3") == "\xcf\x83\xcf\x83\xcf\x82 \xcf\x83");  // ΣΣΣ Σ
    CHECK(speed::ClipTokenizer::normalize("e\xcc\x81") == "\xc3\xa9");                               // NFC
    CHECK(speed::ClipTokenizer::normalize("a\x1b[31mb\x01") == "ab");
    // Mojibake repair (ftfy fix_encoding), and text it must leave alone.
    CHECK(speed::ClipTokenizer::normalize("Schr\xc3\x83\xc2\xb6" "dinger") == "schr\xc3\xb6" "dinger");
    CHECK(speed::ClipTokenizer::normalize("\xc3\xa2\xe2\x82\xac\xc5\x93hi\xc3\xa2\xe2\x82\xac\xc2\x9d") == "\"hi\"");
    CHECK(speed::ClipTokenizer::normalize("caf\xc3\xa9 r\xc3\xa9sum\xc3\xa9") == "caf\xc3\xa9 r\xc3\xa9sum\xc3\xa9");
    CHECK(speed::ClipTokenizer::normalize("\xc2\x93quoted\xc2\x94") == "\"quoted\"");  // C1 as Windows-1252
  }
  SECTION("invalid UTF-8 becomes U+FFFD as Python's errors='replace'") {
    CHECK(speed::ClipTokenizer::normalize("a\xff" "b") == "a\xef\xbf\xbd" "b");
    CHECK(speed::ClipTokenizer::normalize("\xe2\x82") == "\xef\xbf\xbd");             // truncated sequence
    CHECK(speed::ClipTokenizer::normalize("\xed\xa0\x80") == "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // surrogate
    CHECK(speed::ClipTokenizer::normalize("\xc0\xaf") == "\xef\xbf\xbd\xef\xbf\xbd");  // overlong
    CHECK(t.tokenize("\xff\xfe\xfd").n > 2);
  }
  SECTION("pad id is checked") {
    CHECK_THROWS_AS(t.tokenize("a", -1), speed::Error);
    CHECK_THROWS_AS(t.tokenize("a", 49408), speed::Error);
  }
}

TEST_CASE("random bytes never crash and both BPE algorithms agree", "[unit]") {
  const auto& t = gz_tokenizer();
  std::mt19937 rng(12345);
  const char* alphabet[] = {"a", "b", "e", "n", " ", "'", "s", "&", "amp;", "<", "\n", "\xe4\xb8\xad",
                            "\xc3\xa9", "\xf0\x9f\x99\x82", "\xe2\x80\x9c", "\xff", "\x80", "\xce\xa3",
                            "<|endoftext|>", "1", "!", "\xef\xbc\xa1", "\xc2\x85", "\x1b["};
  for (int round = 0; round < 400; ++round) {
    std::string s;
    int len = static_cast<int>(rng() % 60);
    for (int i = 0; i < len; ++i) s += alphabet[rng() % (sizeof alphabet / sizeof *alphabet)];
    auto p = t.tokenize(s);
    CHECK(p.n >= 2);
    CHECK(p.n <= 77);
    for (auto id : p.ids) CHECK((id >= 0 && id < 49408));
  }
  // Long words go through the heap algorithm; short ones through the quadratic loop.
  const auto diffusers_impl = speed::tok::build_from_merges(gunzipped_merges(), "gz", false);
  for (int round = 0; round < 300; ++round) {
    std::vector<std::int32_t> sym;
    int len = 1 + static_cast<int>(rng() % 80);
    const char* letters = "aeinorstlmdcuhgpbkwyvfjqxz";
    for (int i = 0; i < len; ++i) {
      unsigned char ch = static_cast<unsigned char>(letters[rng() % (round % 2 ? 26 : 5)]);
      sym.push_back(diffusers_impl->byte_id[ch]);
    }
    sym.back() += 256;
    auto a = sym, b = sym;
    speed::tok::bpe_naive(diffusers_impl->merges, a);
    speed::tok::bpe_heap(diffusers_impl->merges, b);
    INFO("word of " << len << " symbols: naive " << join(a, 80) << "\n  heap  " << join(b, 80));
    CHECK(a == b);
  }
  // A hostile 200k-letter word must finish quickly (heap BPE).
  std::string word(200000, 'a');
  CHECK(t.encode(word).size() > 0);
}

TEST_CASE("tokenize is thread-safe", "[unit]") {
  const auto& t = gz_tokenizer();
  std::vector<std::string> prompts = {"a photo of Taylor Swift", "Claude Monet painting", "snoopy",
                                      "Hello Kitty and Pikachu", "caf\xc3\xa9 sc\xc3\xa8ne"};
  std::vector<std::vector<std::int32_t>> want;
  for (const auto& s : prompts) want.push_back(to_vec(speed::ClipTokenizer::from_merges_file(kGz).tokenize(s)));
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; i < 500; ++i) {
        std::size_t j = (i + k) % prompts.size();
        if (to_vec(t.tokenize(prompts[j] + " " + std::to_string(i % 7))) .empty()) ++bad;
        if (to_vec(t.tokenize(prompts[j])) != want[j]) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(bad == 0);
}

TEST_CASE("hostile tokenizer files give clear errors", "[unit]") {
  const std::string good = gunzipped_merges();
  auto first_lines = [&](int lines) {
    std::size_t pos = 0;
    for (int i = 0; i < lines; ++i) pos = good.find('\n', pos) + 1;
    return good.substr(0, pos);
  };
  using speed::ClipTokenizer;
  require_error([] { ClipTokenizer::from_merges_text(""); }, "is empty");
  require_error([&] { ClipTokenizer::from_merges_text(first_lines(1000)); }, "has 999 merges, expected at least 48894");
  require_error([&] { ClipTokenizer::from_merges_text(first_lines(10) + "abc\n" + good.substr(first_lines(11).size())); },
                "line 11 is 'abc', expected two tokens separated by one space");
  require_error([&] { ClipTokenizer::from_merges_text(first_lines(3) + "zq qz\n" + good); }, "which no earlier line defines");
  require_error([&] { ClipTokenizer::from_merges_text(first_lines(3) + "a\xff b\n" + good); }, "not valid UTF-8");
  require_error([&] { ClipTokenizer::from_merges_text(first_lines(3) + "a  b\n" + good); }, "two tokens separated by one space");
  require_error([&] { ClipTokenizer::from_merges_text(first_lines(2) + first_lines(2).substr(first_lines(1).size()) + good); },
                "defines token");
  require_error([&] { ClipTokenizer::from_merges_text(std::string(good.substr(0, 40)) + std::string(2000, 'x') + "\n"); },
                "bytes, expected at most 1024");
  // A merges file that loads when the trailing newline or CRLF line ends differ.
  CHECK(ClipTokenizer::from_merges_text(first_lines(48895)).vocab_size() == 49408);

  // Diffusers folder: vocab.json must be the rebuilt vocabulary.
  const std::string vocab = read_all(kDiffusers + "/vocab.json");
  const std::string merges = read_all(kDiffusers + "/merges.txt");
  CHECK(ClipTokenizer::from_diffusers_text(vocab, merges).vocab_size() == 49408);
  require_error([&] { ClipTokenizer::from_diffusers_text("{\"a\": 1", merges); }, "is not valid JSON");
  require_error([&] { ClipTokenizer::from_diffusers_text("[1, 2]", merges); }, "is not a JSON object");
  require_error([&] { ClipTokenizer::from_diffusers_text("{\"!\": 0}", merges); }, "has 1 entries, expected 49408");
  auto doc = nlohmann::json::parse(vocab);
  doc["!"] = 5;
  require_error([&] { ClipTokenizer::from_diffusers_text(doc.dump(), merges); }, "maps '!' to id 5, expected 0");
  doc["!"] = 123456;
  require_error([&] { ClipTokenizer::from_diffusers_text(doc.dump(), merges); }, "to id 123456, expected 0..49407");
  doc["!"] = "zero";
  require_error([&] { ClipTokenizer::from_diffusers_text(doc.dump(), merges); }, "non-integer");
  require_error([&] { ClipTokenizer::from_diffusers_text(vocab, merges.substr(merges.find('\n') + 1)); },
                "expected a '#version' line");

  // Files on disk: missing, not gzip.
  require_error([] { ClipTokenizer::from_merges_file("/nonexistent/bpe.txt.gz"); }, "cannot open tokenizer file");
  const std::string bad_gz = std::string(SPEED_BINARY_DIR) + "/tok_bad.gz";
  {
    std::ofstream f(bad_gz, std::ios::binary);
    f << "\x1f\x8b\x08\x00garbage-after-gzip-magic";
  }
  require_error([&] { ClipTokenizer::from_merges_file(bad_gz); }, "is not valid gzip data");
  std::remove(bad_gz.c_str());
  require_error([] { ClipTokenizer::load(SPEED_SHARED_DIR "/golden"); }, "has no vocab.json");
}

TEST_CASE("find_tokenizer search order", "[unit]") {
  CHECK(speed::find_tokenizer(kGz, kDiffusers) == kGz);
  CHECK(speed::find_tokenizer(std::nullopt, kDiffusers) == kDiffusers);
  require_error([] { speed::find_tokenizer(std::string("/nonexistent/x.gz"), std::nullopt); }, "does not exist");
  ::setenv("SPEED_ERASE_TOKENIZER", kGz.c_str(), 1);
  CHECK(speed::find_tokenizer(std::nullopt, std::string("/nonexistent")) == kGz);
  ::setenv("SPEED_ERASE_TOKENIZER", "/nonexistent/y.gz", 1);
  require_error([] { speed::find_tokenizer(std::nullopt, std::nullopt); }, "$SPEED_ERASE_TOKENIZER");
  ::unsetenv("SPEED_ERASE_TOKENIZER");
  try {
    speed::find_tokenizer(std::nullopt, std::nullopt);
    // Only reachable when the tokenizer is installed in SPEED_DATA_DIR on this machine.
  } catch (const speed::Error& e) {
    CHECK(std::string(e.what()).find("no CLIP tokenizer found") != std::string::npos);
    CHECK(e.hint().find("openai/CLIP") != std::string::npos);
  }
  // load() accepts a model folder holding tokenizer/.
  CHECK(speed::ClipTokenizer::load(kShared + "/golden/fixture_tiny_diffusers").vocab_size() == 49408);
}

TEST_CASE("tokenizer speed on style.csv names and mscoco captions", "[.][bench]") {
  const auto& t = gz_tokenizer();
  std::vector<std::string> texts;
  for (const char* file : {"/data/speed/style.csv", "/data/speed/mscoco.csv"}) {
    std::ifstream f(kShared + file);
    std::string line;
    std::getline(f, line);  // header
    while (std::getline(f, line)) {
      auto comma = line.find(',');
      if (comma != std::string::npos) texts.push_back(line.substr(comma + 1));
    }
  }
  REQUIRE(texts.size() > 1734);
  // Cold (empty word cache) and warm passes, on a fresh tokenizer for the cold one.
  auto fresh = speed::ClipTokenizer::from_merges_file(kGz);
  for (const char* pass : {"cold", "warm"}) {
    auto start = std::chrono::steady_clock::now();
    long tokens = 0;
    for (const auto& s : texts) tokens += fresh.tokenize(s).n - 2;
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    WARN("tokenizer " << pass << ": " << texts.size() << " prompts, " << tokens << " tokens in " << sec
                      << " s = " << static_cast<long>(tokens / sec) << " tokens/s, "
                      << static_cast<long>(texts.size() / sec) << " prompts/s");
  }
  CHECK(t.tokenize(texts[0]).n > 2);
}
