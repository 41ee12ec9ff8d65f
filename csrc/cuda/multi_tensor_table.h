// The pointer tables of multi_tensor.cu, host side. Plain C++ without CUDA headers, so that
// tests/csrc/multi_tensor_table_check.cpp checks the packing on machines without a GPU or nvcc.
//
// A table holds up to kMaxTensors tensors (LISTS device addresses each: params, grads, moments...) and
// a block -> (tensor slot, chunk) map of up to kMaxBlocks entries; block b of a launch processes
// elements [chunk * kChunk, min(size, (chunk + 1) * kChunk)) of its tensor. The whole table is one kernel
// argument (LISTS = 5: 3328 bytes, under the 4 KB limit of older drivers).
#pragma once
#include <cstdint>

namespace pyllm {
namespace cuda {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 65536;

template <int LISTS>
struct TensorTable {
  void* addr[LISTS][kMaxTensors];
  int64_t size[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

// Call launch(table, blocks) for every full table over `lists` (host arrays of device addresses; a null
// list gives null addresses). Empty tensors are skipped; a tensor whose chunks overflow a table
// continues in slot 0 of the next one.
template <int LISTS, class Launch>
void for_each_table(const int64_t* const lists[LISTS], const int64_t* sizes, int64_t n_tensors, Launch launch) {
  TensorTable<LISTS> table;
  int tensors = 0, blocks = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    if (sizes[t] == 0) continue;
    for (int l = 0; l < LISTS; ++l) table.addr[l][tensors] = lists[l] ? reinterpret_cast<void*>(lists[l][t]) : nullptr;
    table.size[tensors] = sizes[t];
    ++tensors;
    const int64_t chunks = (sizes[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      table.block_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (last_chunk && tensors == kMaxTensors) || (last_chunk && t == n_tensors - 1)) {
        launch(table, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the current tensor continues in the next table, in slot 0
          for (int l = 0; l < LISTS; ++l) table.addr[l][0] = table.addr[l][tensors - 1];
          table.size[0] = table.size[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(table, blocks);
}

}  // namespace cuda
}  // namespace pyllm
