// `speed-erase inspect PATH [--json]`: what speed-erase detects in a checkpoint.
#include <iostream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "speed/checkpoint.h"

namespace speed::cli {

SPEED_CLI_COMMAND(inspect) {
  struct Options {
    std::string path;
    bool json = false;
  };
  auto opts = std::make_shared<Options>();
  auto* sub = app.add_subcommand("inspect", "show family, layout, dtypes, text encoder config and K/V layers");
  sub->add_option("path", opts->path, "a .safetensors file or a diffusers folder")->required();
  sub->add_flag("--json", opts->json, "print one JSON object (stable key order)");
  sub->add_flag_function("-q,--quiet", [&globals](std::int64_t) { globals.verbosity = -1; }, "warnings only");
  sub->add_flag_function("-v,--verbose", [&globals](std::int64_t) { globals.verbosity = 1; }, "debug output");
  sub->callback([&action, opts] {
    action = [opts] {
      Checkpoint ck = open_checkpoint(opts->path);
      if (opts->json) {
        std::cout << describe_checkpoint(ck).dump(2) << "\n";
      } else {
        std::cout << describe_checkpoint_text(ck);
      }
      return 0;
    };
  });
}

}  // namespace speed::cli
