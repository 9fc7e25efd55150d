// [cuda]: the text encoder on the GPU gives the CPU's rows (float32, TF32 off) and the float64
// golden's (largest absolute difference). Without a GPU: skipped with a visible warning, or
// failed under SPEED_REQUIRE_CUDA=1.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "speed/checkpoint.h"
#include "speed/clip.h"
#include "speed/safetensors.h"
#include "speed/tensor.h"
#include "test_clip_close.h"
#include "test_cuda.h"

using namespace speed;
using speed::test::check_close;

TEST_CASE("cuda: the text encoder on the GPU matches the CPU and the float64 golden", "[cuda]") {
  if (!test::cuda_or_skip()) return;
  const std::string golden_dir = std::string(SPEED_SHARED_DIR) + "/golden/";
  const Checkpoint ck = open_checkpoint(golden_dir + "fixture_tiny_f32.safetensors");
  auto cpu = TextEncoder::load(ck, 0, {at::kFloat, "cpu"});
  auto gpu = TextEncoder::load(ck, 0, {at::kFloat, "cuda"});
  REQUIRE(gpu->device().is_cuda());

  // The empty prompt against the golden (the CPU float32 tolerance of test_clip.cpp).
  auto golden = SafeTensors::open(golden_dir + "edits_tiny.safetensors");
  const at::Tensor want = tensor_view_unowned(golden, golden.at("empty_prompt/hidden_states"));
  std::vector<std::int64_t> empty(77, 49407);
  empty[0] = 49406;
  const at::Tensor ids = at::tensor(empty, at::kLong).unsqueeze(0);
  const at::Tensor out = gpu->forward(ids.to(at::kCUDA));
  CHECK(out.device().is_cuda());
  check_close(out[0], want, 4e-5, "empty prompt vs golden");

  // Seeded ids: one full batch, and two batches of other lengths in one pass.
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(20261207);
  const std::int64_t vocab = gpu->info().vocab;
  const at::Tensor full = at::randint(vocab, {3, 77}, g, at::TensorOptions().dtype(at::kLong));
  check_close(gpu->forward(full.to(at::kCUDA)), cpu->forward(full), 1e-4, "3 x 77 random ids");
  const std::vector<at::Tensor> batches = {
      at::randint(vocab, {2, 5}, g, at::TensorOptions().dtype(at::kLong)),
      at::randint(vocab, {4, 12}, g, at::TensorOptions().dtype(at::kLong))};
  const std::vector<at::Tensor> on_gpu = {batches[0].to(at::kCUDA), batches[1].to(at::kCUDA)};
  const auto many_gpu = gpu->forward_many(on_gpu);
  const auto many_cpu = cpu->forward_many(batches);
  REQUIRE(many_gpu.size() == 2);
  check_close(many_gpu[0], many_cpu[0], 1e-4, "forward_many batch 0 (2 x 5)");
  check_close(many_gpu[1], many_cpu[1], 1e-4, "forward_many batch 1 (4 x 12)");
}
