// src/cli/commands.h: each subcommand lives in its own cmd_<name>.cc and registers itself on the
// CLI11 app; its callback stores the action that main() runs inside the one try/catch.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace speed::cli {

using Action = std::function<int()>;

// Global flags shared by every subcommand.
struct Globals {
  int verbosity = 0;  // -1 quiet, 0 info, 1 debug
};

#define SPEED_CLI_COMMAND(name) \
  void add_##name##_command(CLI::App& app, Action& action, Globals& globals)

// Weak until every command exists, so a partial tree still links.
__attribute__((weak)) SPEED_CLI_COMMAND(erase);
__attribute__((weak)) SPEED_CLI_COMMAND(inspect);
__attribute__((weak)) SPEED_CLI_COMMAND(tokenize);
__attribute__((weak)) SPEED_CLI_COMMAND(encode);
__attribute__((weak)) SPEED_CLI_COMMAND(eval);

// Sets up the library logger on stderr for the chosen verbosity.
void setup_logging(const Globals& globals);

}  // namespace speed::cli
