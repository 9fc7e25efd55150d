// test_clip: comparing encoder outputs (CPU or GPU) with a tolerance on the largest absolute
// difference, printing the worst element side by side when over it.
#pragma once

#include <ATen/ATen.h>

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>

namespace speed::test {

inline void check_close(const at::Tensor& got_any, const at::Tensor& want_any, double tol,
                        const std::string& what) {
  const at::Tensor got = got_any.cpu(), want = want_any.cpu();
  REQUIRE(got.sizes() == want.sizes());
  at::Tensor d = (got.to(at::kDouble) - want.to(at::kDouble)).abs();
  const double m = d.max().item<double>();
  const auto idx = d.argmax().item<std::int64_t>();
  INFO(what << ": max abs diff " << m << " (tolerance " << tol << ") at flat index " << idx
            << ": got " << got.reshape(-1)[idx].item<double>() << ", expected "
            << want.reshape(-1)[idx].item<double>());
  CHECK(m <= tol);
}

}  // namespace speed::test
