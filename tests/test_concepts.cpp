// concepts: concept files, CSV, the retain filter (vs Python's re), presets, and every error.
#include <cstdio>
#include <fstream>
#include <sstream>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "speed/concepts.h"
#include "speed/error.h"

using namespace speed;
using Catch::Contains;

namespace {

const std::string kData = std::string(SPEED_SHARED_DIR) + "/data/speed/";

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

std::vector<std::string> texts(const std::vector<ConceptEntry>& v) {
  std::vector<std::string> out;
  for (const auto& e : v) out.push_back(e.text);
  return out;
}

std::string temp_file(const std::string& name, const std::string& content) {
  const std::string path = std::string(SPEED_BINARY_DIR) + "/test_concepts_" + name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

std::string read(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

ConceptEntry entry(const std::string& t) { return {t, std::nullopt, "test"}; }

}  // namespace

TEST_CASE("concept files: comments, blanks, anchors, UTF-8", "[unit]") {
  const auto e = parse_concept_text(
      "\xEF\xBB\xBF# artists\n  Van Gogh  \r\n\nPicasso => art\nMonet =>\n  # indented comment\nC# "
      "=> \n",
      "list.txt");
  REQUIRE(texts(e) == std::vector<std::string>{"Van Gogh", "Picasso", "Monet", "C#"});
  CHECK_FALSE(e[0].anchor);
  CHECK(*e[1].anchor == "art");
  CHECK(*e[2].anchor == "");
  CHECK(e[1].origin == "file 'list.txt' line 4");
  CHECK_THAT(error_of([] { parse_concept_text("ok\nbad \xC3\x28 byte\n", "x.txt"); }),
             Contains("file 'x.txt' line 2 is not valid UTF-8"));
  CHECK_THAT(error_of([] { parse_concept_text("a\xED\xA0\x80", "s.txt"); }),
             Contains("not valid UTF-8"));  // surrogate
  CHECK_THAT(error_of([] { parse_concept_text("\xC0\xAF", "o.txt"); }),
             Contains("not valid UTF-8"));  // overlong
  CHECK_THAT(error_of([] { parse_concept_text(" => art\n", "y.txt"); }),
             Contains("line 1 has an anchor but no target"));
  CHECK_THAT(error_of([] { parse_concept_text("a => b => c\n", "y.txt"); }),
             Contains("more than one '=>'"));
  CHECK_THAT(
      error_of([] { parse_concept_text(std::string(kMaxConceptLineBytes + 1, 'a'), "long.txt"); }),
      Contains("file 'long.txt' line 1 is 16385 bytes long, the limit is 16384"));
  std::string many;
  for (std::size_t i = 0; i <= kMaxConcepts; ++i) many += "c\n";
  CHECK_THAT(error_of([&] { parse_concept_text(many, "many.txt"); }),
             Contains("more than 100000 concepts"));
}

TEST_CASE("CSV: RFC 4180 quoting, BOM, CRLF, filters, limits", "[unit]") {
  const CsvTable t = parse_csv(
      "\xEF\xBB\xBFid,type,concept\r\n1,erase,\"Huey, Dewey, and Louie\"\r\n2,retain,\"say "
      "\"\"hi\"\"\"\r\n"
      "3,erase,\"two\nlines\"\r\n4,erase,\"Huey, Dewey, and Louie\"\r\n\r\n",
      "t.csv");
  REQUIRE(t.header == std::vector<std::string>{"id", "type", "concept"});
  REQUIRE(t.rows.size() == 4);
  CHECK(t.row_lines == std::vector<std::size_t>{2, 3, 4, 6});
  CHECK(texts(csv_column(t, "t.csv", "concept")) ==
        std::vector<std::string>{"Huey, Dewey, and Louie", "say \"hi\"", "two\nlines"});
  CHECK(texts(csv_column(t, "t.csv", "concept", "type", "erase")) ==
        std::vector<std::string>{"Huey, Dewey, and Louie", "two\nlines"});
  CHECK_THAT(error_of([&] { csv_column(t, "t.csv", "name"); }),
             Contains("file 't.csv' has no column 'name' (columns: id, type, concept)"));
  CHECK_THAT(error_of([] { parse_csv("a,b\n1,2,3\n", "f.csv"); }),
             Contains("file 'f.csv' line 2 has 3 fields, expected 2"));
  CHECK_THAT(error_of([] { parse_csv("a,b\n1,\"open\n", "f.csv"); }),
             Contains("line 2: a quoted field is not closed"));
  CHECK_THAT(error_of([] { parse_csv("a,b\n1,\"x\"y\n", "f.csv"); }),
             Contains("unexpected character after a closing quote"));
  CHECK_THAT(error_of([] { parse_csv("a,b\n1,x\"y\n", "f.csv"); }),
             Contains("a quote inside an unquoted field"));
  CHECK_THAT(error_of([] { parse_csv("a,a\n", "f.csv"); }), Contains("names column 'a' twice"));
  CHECK_THAT(error_of([] { parse_csv("", "e.csv"); }), Contains("file 'e.csv' is empty"));
  CHECK_THAT(error_of([] {
               parse_csv("a\n\"" + std::string(kMaxConceptLineBytes + 10, 'x') + "\"\n", "l.csv");
             }),
             Contains("longer than the limit"));
  CHECK_THAT(error_of([] { parse_csv(std::string(2000, ',') + "\n", "w.csv"); }),
             Contains("more than 1024 fields"));
}

TEST_CASE("the paper's CSV files", "[unit]") {
  const auto instance = read_source(kData + "instance.csv:concept");
  CHECK(instance.size() ==
        1346);  // 1,352 rows; exact de-dup keeps 'Aladdin' and 'Aladdin ' apart (as pandas)
  const auto erase10 = read_source(kData + "10_celebrity.csv:concept:type=erase");
  CHECK(erase10.size() == 10);
  CHECK(erase10[0].text == "Adam Driver");
  CHECK(read_source(kData + "100_celebrity.csv:concept:type=retain").size() == 100);
  CHECK(read_source(kData + "10_celebrity.csv:concept").size() == 110);
  CHECK(read_source("style.csv:concept", kData).size() == 1734);  // resolved in the data dir
  CHECK(read_source("style.csv", kData).size() == 1734);          // a CSV without column: 'concept'
  CHECK_THAT(error_of([] { read_source(kData + "mscoco.csv"); }), Contains("needs a column"));
  CHECK_THAT(error_of([] { read_source("no-such-file.txt"); }),
             Contains("cannot open 'no-such-file.txt'"));
  CHECK_THAT(error_of([] { read_source(kData + "instance.csv:concept:=x"); }),
             Contains("has no column name"));
  CHECK(resolve_data_path("instance.csv", kData) == kData + "instance.csv");
  CHECK(resolve_data_path("missing.csv", kData) == "missing.csv");
  const SourceSpec s = parse_source_spec("C:/dir/a.csv:concept:type=erase",
                                         [](const std::string&) { return false; });
  CHECK(s.path == "C:/dir/a.csv");
  CHECK(*s.column == "concept");
  CHECK(*s.where_key == "type");
  CHECK(*s.where_value == "erase");
  const SourceSpec whole =
      parse_source_spec("odd:name.txt", [](const std::string& p) { return p == "odd:name.txt"; });
  CHECK(whole.path == "odd:name.txt");
  CHECK_FALSE(whole.column);
}

TEST_CASE("lower-casing and whole words follow Python's str.lower() and re \\b", "[unit]") {
  // Expected values printed by Python 3.11.
  CHECK(lower_text("\u039f\u0394\u039f\u03a3 \u03a3\u0391\u03a3.") ==
        "\u03bf\u03b4\u03bf\u03c2 \u03c3\u03b1\u03c2.");
  CHECK(lower_text("\u0130stanbul") == "i\u0307stanbul");
  CHECK(lower_text("\u01c5emal \u1e9e \u216b \uff21\uff22\uff23") ==
        "\u01c6emal \u00df \u217b \uff41\uff42\uff43");
  CHECK(lower_text("\u03a3") == "\u03c3");
  CHECK(lower_text("A\u03a3'") == "a\u03c2'");
  CHECK(lower_text("\u0386\u03a3\u0308\u0391") == "\u03ac\u03c3\u0308\u03b1");
  CHECK(lower_text("Hello Kitty") == "hello kitty");
  struct Case {
    const char* text;
    const char* word;
    bool hit;
  };
  const Case cases[] = {{"a photo of hello kitty", "hello kitty", true},
                        {"hello kittyland", "hello kitty", false},
                        {"mr. t rex", "t", true},
                        {"c++ code", "c++", false},
                        {"c++code", "c++", true},
                        {"x c++ y", "c++", false},
                        {"na\u00efve art", "na", false},
                        {"caf\u00e9", "caf", false},
                        {"snoopy_dog", "snoopy", false},
                        {"snoopy-dog", "snoopy", true},
                        {"\u65e5\u672c\u8a9e\u30c6\u30ad\u30b9\u30c8", "\u65e5\u672c", false},
                        {"(monet)", "monet", true},
                        {"monet2", "monet", false},
                        {"claude monet", "monet", true},
                        {"a (b) c", "(b)", false},
                        {"a(b)c", "(b)", true},
                        {"x.y", ".", true},
                        {"tom's", "tom", true},
                        {"\u217b kings", "\u217b", true},
                        {"monetmonet monet", "monet", true},
                        {"", "a", false}};
  for (const auto& c : cases) {
    INFO("text '" << c.text << "' word '" << c.word << "'");
    CHECK(contains_whole_word(c.text, c.word) == c.hit);
  }
}

TEST_CASE("concept sets: anchors, de-dup, the target filter, errors", "[unit]") {
  std::vector<ConceptEntry> t = {entry("Snoopy"), entry("Mickey")};
  std::vector<std::vector<ConceptEntry>> retain = {
      {entry("Snoopy the dog"), entry("Goofy"), entry("Goofy"), entry("mickey mouse"),
       entry("Mickeyland")},
      {entry("Goofy"), entry("Donald ")}};
  ConceptSet s = build_concept_set(t, {"cartoon"}, retain);
  CHECK(s.anchors == std::vector<std::string>{"cartoon", "cartoon"});
  CHECK(s.retain == std::vector<std::string>{"Goofy", "Mickeyland", "Donald "});
  CHECK(s.dropped == std::vector<std::string>{"Snoopy the dog", "mickey mouse"});
  CHECK(s.retain_total == 7);
  CHECK(s.retain_unique == 5);
  CHECK_THAT(s.notes.at(0), Contains("2 duplicate texts removed"));
  CHECK(build_concept_set(t, {}, {}).anchors == std::vector<std::string>{"", ""});
  CHECK_FALSE(build_concept_set(t, {}, {}).has_retain_source);
  CHECK(build_concept_set(t, {"a", "b"}, {}).anchors == std::vector<std::string>{"a", "b"});
  t[1].anchor = "mouse";
  CHECK(build_concept_set(t, {"dog"}, {}).anchors == std::vector<std::string>{"dog", "mouse"});
  CHECK_THAT(error_of([&] { build_concept_set(t, {"a", "b"}, {}); }), Contains("both per line"));

  const std::vector<ConceptEntry> two = {entry("Snoopy"), entry("Mickey")};
  CHECK_THAT(error_of([&] {
               build_concept_set(two, {"a", "b", "c"}, {});
             }),
             Contains("3 anchors for 2 targets, expected 1 or 2"));
  CHECK_THAT(error_of([&] {
               build_concept_set({entry("Snoopy"), {"snoopy", std::nullopt, "line 9"}}, {}, {});
             }),
             Contains("target 'snoopy' (line 9) repeats target 'Snoopy' (test)"));
  CHECK_THAT(error_of([&] {
               build_concept_set(two, {}, {{entry("Snoopy"), entry("a mickey")}});
             }),
             Contains("every one of the 2 retain texts contains a target"));
  CHECK_THAT(error_of([&] { build_concept_set({}, {}, {}); }), Contains("no target concept"));
  CHECK_THAT(error_of([&] { build_concept_set({entry("  ")}, {}, {}); }),
             Contains("empty target concept"));
  try {
    build_concept_set(two, {"a", "b", "c"}, {});
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::Usage);
  }
}

TEST_CASE("retain counts of the golden cases", "[golden]") {
  std::ifstream f(std::string(SPEED_SHARED_DIR) + "/golden/edits_tiny.json");
  const auto j = nlohmann::json::parse(f);
  for (const char* name : {"instance_iec0", "style_iec0", "celebrity_iec0"}) {
    const auto& c = j.at("cases").at(name);
    ConceptInputs in;
    in.concept_texts = c.at("targets").get<std::vector<std::string>>();
    in.anchors = c.at("anchors").get<std::vector<std::string>>();
    in.retain_sources = {c.at("retain_source").get<std::string>()};
    in.data_dir = kData;
    std::string& src = in.retain_sources[0];
    src = src.substr(src.rfind('/') +
                     1);  // "../shared/data/speed/x.csv:concept" -> resolved in the data dir
    const ConceptSet s = load_concepts(in);
    INFO(name);
    CHECK(s.retain_unique == c.at("retain").at("texts").get<std::size_t>());
    CHECK(s.retain.size() == c.at("retain").at("kept").get<std::size_t>());
    auto dropped = s.dropped;
    std::sort(dropped.begin(), dropped.end());
    CHECK(dropped == c.at("retain").at("dropped_texts").get<std::vector<std::string>>());
  }
}

TEST_CASE("concept files and CSV sources through load_concepts", "[unit]") {
  const std::string list = temp_file("list.txt", "# targets\nSnoopy => dog\nMickey\n");
  ConceptInputs in;
  in.concept_sources = {list};
  in.concept_texts = {"Spongebob"};
  in.anchors = {""};
  in.retain_sources = {kData + "instance.csv:concept"};
  const ConceptSet s = load_concepts(in);
  CHECK(s.targets == std::vector<std::string>{"Snoopy", "Mickey", "Spongebob"});
  CHECK(s.anchors == std::vector<std::string>{"dog", "", ""});
  CHECK(s.retain_unique == 1346);
  CHECK(s.retain_total == 1352);  // instance.csv has 6 repeated values
  CHECK_THAT(s.notes.at(0), Contains("retain: 6 duplicate texts removed (1352 read, 1346 unique)"));
  in.concept_sources = {temp_file("bad.txt", "ok\n\xFF\n")};
  CHECK_THAT(error_of([&] { load_concepts(in); }),
             Contains("test_concepts_bad.txt' line 2 is not valid UTF-8"));
  in.concept_sources = {temp_file("empty.txt", "# nothing\n\n")};
  CHECK_THAT(error_of([&] { load_concepts(in); }), Contains("has no concepts"));
  in.concept_sources = {};
  in.retain_sources = {kData + "10_celebrity.csv:concept:type=nothing"};
  CHECK_THAT(error_of([&] { load_concepts(in); }), Contains("has no texts"));
}

TEST_CASE("presets: built-ins equal configs/*.json, keys and types checked", "[unit]") {
  for (const auto& name : preset_names()) {
    INFO("preset " << name << ": the built-in copy in src/concepts_preset.cc must equal configs/"
                   << name << ".json");
    CHECK(*builtin_preset_json(name) ==
          read(std::string(SPEED_SOURCE_DIR) + "/configs/" + name + ".json"));
    const Preset p = load_preset(name);
    CHECK(p.source == "built-in");
    for (const auto& r : p.retain)
      CHECK(read_source(r, kData).size() >= 100);  // names resolve in the data dir
    for (const auto& c : p.concept_sources) CHECK(read_source(c, kData).size() == 10);
  }
  const Preset c = load_preset("celebrity");
  CHECK(*c.threshold == 1e-4);
  CHECK(*c.retain_scale == 0.05);
  CHECK(*c.no_filter);
  CHECK(*c.anchor == std::vector<std::string>{"person"});
  const Preset n = load_preset("nudity");
  CHECK(n.concept_texts == std::vector<std::string>{"nudity"});
  CHECK(*n.all_tokens);
  CHECK(*n.lambda == 0.5);
  CHECK(n.retain.empty());
  const Preset f = load_preset(
      temp_file("p.json", R"({"augment": 0, "anchor": ["a", "b"], "seed": 3, "no-iec": true})"));
  CHECK(*f.augment == 0);
  CHECK(*f.seed == 3);
  CHECK(f.anchor->size() == 2);
  CHECK_THAT(error_of([] { parse_preset(R"({"augmentation": 3})", "x.json"); }),
             Contains("preset 'x.json' has an unknown key 'augmentation'"));
  CHECK_THAT(error_of([] { parse_preset(R"({"augment": "3"})", "x.json"); }),
             Contains("key 'augment' is a string, expected an integer"));
  CHECK_THAT(error_of([] { parse_preset(R"({"no-filter": 1})", "x.json"); }),
             Contains("expected a boolean"));
  CHECK_THAT(error_of([] { parse_preset(R"({"retain": [1]})", "x.json"); }),
             Contains("expected a string (in the array)"));
  CHECK_THAT(error_of([] { parse_preset("[1]", "x.json"); }), Contains("expected a JSON object"));
  CHECK_THAT(error_of([] { parse_preset("{", "x.json"); }), Contains("is not valid JSON"));
  CHECK_THAT(error_of([] { load_preset("sd-famous"); }),
             Contains("unknown preset 'sd-famous', expected one of instance"));
  CHECK_THAT(error_of([] { load_preset("nope.json"); }), Contains("cannot open 'nope.json'"));
}
