// Replays every table that csrc/cuda/multi_tensor_table.h's for_each_table launches, indexing it as the
// kernels of multi_tensor.cu do, and checks that each element of each tensor is visited exactly once.
// Built and run by test_multi_tensor_table.py; exit status 0 when every case passes.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/multi_tensor_table.h"

using pyllm::cuda::for_each_table;
using pyllm::cuda::kChunk;
using pyllm::cuda::kMaxBlocks;
using pyllm::cuda::kMaxTensors;
using pyllm::cuda::TensorTable;

namespace {

constexpr int64_t kAddrStep = int64_t(1) << 40;  // fake device address of tensor t: (t + 1) * kAddrStep

// Returns the number of problems found for tensors of these sizes.
int check(const std::vector<int64_t>& sizes) {
  const int64_t n = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> grads(n), moments(n);
  std::vector<std::vector<unsigned char>> visits(n);
  for (int64_t t = 0; t < n; ++t) {
    grads[t] = (t + 1) * kAddrStep;
    moments[t] = (t + 1) * kAddrStep + 8;
    visits[t].assign(sizes[t], 0);
  }
  const int64_t* lists[3] = {grads.data(), nullptr, moments.data()};  // a null list, as without master weights
  int problems = 0;
  for_each_table<3>(lists, sizes.data(), n, [&](const TensorTable<3>& table, int blocks) {
    if (blocks <= 0 || blocks > kMaxBlocks) {
      ++problems;
      return;
    }
    for (int b = 0; b < blocks; ++b) {
      const int slot = table.block_tensor[b];
      const int64_t addr = reinterpret_cast<int64_t>(table.addr[0][slot]);
      const int64_t t = addr / kAddrStep - 1;
      if (slot >= kMaxTensors || t < 0 || t >= n || addr % kAddrStep || table.addr[1][slot] != nullptr ||
          reinterpret_cast<int64_t>(table.addr[2][slot]) != moments[t] || table.size[slot] != sizes[t]) {
        ++problems;
        continue;
      }
      const int64_t start = int64_t(table.block_chunk[b]) * kChunk;
      const int64_t len = std::min<int64_t>(kChunk, table.size[slot] - start);
      if (start < 0 || len <= 0) {
        ++problems;
        continue;
      }
      for (int64_t i = start; i < start + len; ++i) visits[t][i]++;
    }
  });
  for (int64_t t = 0; t < n; ++t)
    if (std::any_of(visits[t].begin(), visits[t].end(), [](unsigned char v) { return v != 1; })) ++problems;
  if (problems) {
    std::printf("FAIL: %d problems for sizes", problems);
    for (int64_t s : sizes) std::printf(" %lld", static_cast<long long>(s));
    std::printf("\n");
  }
  return problems;
}

}  // namespace

int main() {
  const int64_t C = kChunk;
  std::vector<std::vector<int64_t>> cases = {
      {1, 91, 300000, 30},
      std::vector<int64_t>(100, 17),                  // more tensors than a table holds
      {C, C + 1, 2 * C, 2 * C - 1, 0, 5, 0},          // chunk boundaries and empty tensors
      {kMaxBlocks * C + 1000, 3, 7},                  // one tensor longer than a table
      {5, (kMaxBlocks - 1) * C, 2 * C, 3},            // a table fills in the middle of a tensor
      {0, 0, 0},
      {},
  };
  std::vector<int64_t> full(kMaxTensors, C);
  full.push_back(1);  // exactly a full table of tensors, then one more
  cases.push_back(full);
  std::mt19937 rng(1);
  for (int k = 0; k < 300; ++k) {
    std::vector<int64_t> sizes(1 + rng() % 90);
    for (int64_t& s : sizes) s = rng() % 4 == 0 ? 0 : rng() % 3 == 0 ? int64_t(rng() % (40 * C)) : int64_t(rng() % 5000);
    cases.push_back(sizes);
  }
  int failed = 0;
  for (const auto& sizes : cases) failed += check(sizes) != 0;
  std::printf("%d of %zu cases failed\n", failed, cases.size());
  return failed != 0;
}
