// The CUDA emulator's runtime: runs csrc/cuda's kernels, translated to host C++ (cuda_emulator/__init__.py),
// on the CPU, so CI executes them (no GPU there) and catches what a wrong index, a missing barrier or an
// unaligned vector access does before any GPU sees the code.
//
// Model: each CUDA thread of a block is a fiber (its own stack; emu_switch_context) and one OS thread runs
// them in turn: a thread runs until it reaches a barrier (__syncthreads, __syncwarp, a shuffle, a WMMA
// load) or returns; a barrier releases once every live thread it waits for has reached it. Warp by warp
// (run_block): one warp runs ahead through its warp barriers until it waits at __syncthreads, then the
// next, so a read that no barrier orders after another thread's write sees garbage, deterministically
// (EMU_ORDER=reverse lets the last warp run ahead instead). The blocks of a grid run one after another,
// each with fresh shared memory filled with garbage (a kernel must write what it reads). Warp shuffles
// exchange through a per-warp slot array between warp barriers; WMMA (mma.h here) works on whole 16 x 16
// tiles; cp.async copies land only at the cp.async.wait_group that covers them (cuda/pipeline.cuh here),
// so a wait that is too weak reads garbage.
// Checked (an error fails the launch with a RuntimeError naming the first problem): empty or oversized
// grids and blocks, dynamic shared memory above 48 KB without the opt-in or above the GPU's limit (an
// H100's unless set_shared_memory_optin says otherwise), full-mask shuffles while lanes of the warp have
// returned, __syncthreads after part of the block returned, barriers that can never release (deadlock),
// 128-bit accesses (Pack) and cp.async/WMMA pointers that are not aligned, cp.async and WMMA accesses
// outside the block's shared memory, cp.async groups still pending when a thread returns. Built with
// AddressSanitizer, reads and writes outside a tensor or a shared array are caught too.
// Not modelled: hardware fragment layouts, the compiler's reordering of memory operations, bank
// conflicts, concurrent blocks, timing, __expf/rsqrtf precision (exact functions here).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // types only (dim3, uint3, cudaStream_t, cudaError_t)

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <typeindex>
#include <utility>
#include <vector>

#include <sys/mman.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__  // every __shared__ declaration is rewritten by the translator; a leftover fails to compile
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {

// ------------------------------------------------------------------ errors
inline std::mutex error_mu;
inline std::string first_error;  // of the running launch
inline std::atomic<int> errors{0};

inline void fail(const std::string& what) {
  std::lock_guard<std::mutex> g(error_mu);
  if (errors.fetch_add(1) == 0) first_error = what;
}

// ------------------------------------------------------------------ fibers
// Save the callee-saved registers and the stack pointer in *save, continue on the stack `to` (module.cpp
// defines it, x86-64 System V). A fiber's first switch returns into thread_entry (new_fiber_stack).
extern "C" void emu_switch_context(void** save, void* to);

// ------------------------------------------------------------------ blocks and threads
struct Copy {
  void* dst;
  const void* src;
  bool pred;  // false: zero-fill (cp.async with src-size 0)
};

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Thread {
  struct Block* blk;
  uint3 tid;
  int linear;
  Wait wait = Wait::kNone;
  std::vector<Copy> open;                    // cp.async issued, not yet committed
  std::deque<std::vector<Copy>> committed;   // committed groups, oldest first
  void* sp = nullptr;  // saved stack pointer while it is not running
  void* stack = nullptr;
  void* asan_fake_stack = nullptr;
};

struct Block {
  dim3 grid, block, idx;
  int nthreads = 0;
  std::vector<Thread> threads;
  std::vector<int> warp_alive;  // lanes of each warp that have not returned
  int exited = 0;
  std::vector<uint64_t> shfl;  // one 8-byte slot per thread
  std::map<std::pair<std::type_index, int>, std::unique_ptr<unsigned char[]>> statics;  // __shared__ arrays
  unsigned char* dynamic = nullptr;  // extern __shared__
  size_t dynamic_bytes = 0;
};

inline thread_local Thread* cur = nullptr;
inline thread_local void* scheduler_sp = nullptr;
inline thread_local std::function<void()>* kernel_body = nullptr;
inline thread_local const void* scheduler_stack = nullptr;  // (ASan) the OS thread's stack, learnt on entry
inline thread_local size_t scheduler_stack_size = 0;
inline thread_local void* scheduler_fake_stack = nullptr;
inline int lane() { return cur->linear % 32; }
inline int warp() { return cur->linear / 32; }

constexpr unsigned char kGarbage = 0x7f;  // 0x7f7f7f7f: a float of 3.4e38, a half/bf16 of nan/3.4e38

template <class Arr>
Arr& block_shared(int id) {
  auto& slot = cur->blk->statics[{std::type_index(typeid(Arr)), id}];
  if (!slot) {
    slot.reset(new unsigned char[sizeof(Arr)]);
    std::memset(slot.get(), kGarbage, sizeof(Arr));
  }
  return *reinterpret_cast<Arr*>(slot.get());
}
inline unsigned char* dynamic_shared() { return cur->blk->dynamic; }

// Inside the block's dynamic shared memory (the kernels' WMMA tiles and cp.async targets all live there).
inline bool in_shared(const void* p, size_t n) {
  auto* c = static_cast<const unsigned char*>(p);
  const Block* b = cur->blk;
  return b->dynamic && c >= b->dynamic && c + n <= b->dynamic + b->dynamic_bytes;
}

// Give control back to the scheduler until it resumes this thread.
inline void yield_to_scheduler(bool finished = false) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &cur->asan_fake_stack, scheduler_stack, scheduler_stack_size);
#endif
  emu_switch_context(&cur->sp, scheduler_sp);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(cur->asan_fake_stack, nullptr, nullptr);
#endif
}

inline void syncthreads() {
  if (cur->blk->exited)
    fail("__syncthreads after " + std::to_string(cur->blk->exited) + " threads of the block returned");
  cur->wait = Wait::kBlock;
  yield_to_scheduler();
}

inline void syncwarp() {
  cur->wait = Wait::kWarp;
  yield_to_scheduler();
}

// __shfl_xor_sync (xor) and __shfl_sync (src = lane index), full warps only.
template <class T>
T shuffle(unsigned mask, T v, int arg, bool xor_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type above 8 bytes");
  Block* b = cur->blk;
  const int w = warp(), l = lane();
  if (mask != 0xffffffffu) fail("warp shuffle with a partial mask");
  if (b->warp_alive[w] != 32)
    fail("full-mask warp shuffle while lanes of warp " + std::to_string(w) + " have returned");
  uint64_t* slot = b->shfl.data() + w * 32;
  syncwarp();
  std::memcpy(&slot[l], &v, sizeof(T));
  syncwarp();
  T r;
  std::memcpy(&r, &slot[(xor_lane ? (l ^ arg) : arg) & 31], sizeof(T));
  syncwarp();
  return r;
}

// ------------------------------------------------------------------ checked vector accesses
template <class PackT, class T>
PackT* vector_at(T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(PackT))
    fail("a " + std::to_string(sizeof(PackT)) + "-byte vector access at an address " +
         std::to_string(reinterpret_cast<uintptr_t>(p) % alignof(PackT)) + " bytes off its alignment");
  return reinterpret_cast<PackT*>(p);
}

// ------------------------------------------------------------------ cp.async
inline void cp_async16(void* dst, const void* src, bool pred) {
  if (reinterpret_cast<uintptr_t>(dst) % 16) fail("cp.async: shared destination not 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async: global source not 16-byte aligned");
  if (!in_shared(dst, 16)) fail("cp.async: destination outside the block's shared memory");
  cur->open.push_back({dst, src, pred});
}
inline void land(std::vector<Copy>& group) {
  for (auto& c : group) {
    if (c.pred) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
}
inline void cp_async_commit() {
  cur->committed.push_back(std::move(cur->open));
  cur->open.clear();
}
inline void cp_async_wait(int pending) {
  while (static_cast<int>(cur->committed.size()) > pending) {
    land(cur->committed.front());
    cur->committed.pop_front();
  }
}

// ------------------------------------------------------------------ dynamic shared memory opt-in
constexpr int kOptinH100 = 232448;  // cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
inline std::atomic<int> optin_bytes{kOptinH100};  // the emulated GPU's (module.cpp sets it for tests)
inline int optin() { return optin_bytes.load(); }
inline std::mutex attr_mu;
inline std::map<const void*, int> smem_attr;
inline cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes > optin()) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> g(attr_mu);
  smem_attr[kernel] = bytes;
  return cudaSuccess;
}

// ------------------------------------------------------------------ launch
// Per CUDA thread, with a guard page below (an overflow is a segfault, not corruption).
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

extern "C" inline void emu_thread_entry();

// The initial stack of a fiber: what emu_switch_context pops (MXCSR and x87 control word, r15 ... rbp, all
// but the first zero), then the address it returns to.
inline void* new_fiber_stack(void* base) {
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(base) + kStackBytes) & ~uintptr_t(15));
  uint64_t* sp = top - 9;  // after `ret`, rsp = top - 1 word: 8 mod 16, as on entry to a called function
  sp[0] = 0x037F00001F80ull;  // MXCSR 0x1F80 (low half), x87 control word 0x037F (bytes 4-5): the defaults
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&emu_thread_entry);
  sp[8] = 0;  // the entry's return address: it never returns
  return sp;
}

// Run the threads of the current block until every one has returned. Warp by warp, as unfairly as the
// hardware may be: the first warp (in EMU_ORDER) with a runnable lane, or whose live lanes all wait at a
// warp barrier (then released), runs on until it waits at __syncthreads or returns; only then the next
// warp gets its turn. So one warp races as far ahead of the others as the block's barriers allow: a read
// of another warp's data that no __syncthreads orders after the write sees garbage. When every live thread
// waits at __syncthreads, all are released; nothing to run or release with threads left is a deadlock.
inline void run_block(Block& b, bool reverse) {
  const int n = b.nthreads, warps = n / 32;
  auto lane_of = [&](int w, int l) -> Thread& { return b.threads[(reverse ? warps - 1 - w : w) * 32 + l]; };
  for (;;) {
    bool progressed = false;
    for (int w = 0; w < warps && !progressed; ++w) {
      bool runnable = false, releasable = true, alive = false;
      for (int l = 0; l < 32; ++l) {
        const Wait s = lane_of(w, l).wait;
        runnable |= s == Wait::kNone;
        releasable &= s == Wait::kWarp || s == Wait::kDone;
        alive |= s != Wait::kDone;
      }
      if (!runnable && !(releasable && alive)) continue;
      progressed = true;
      for (int l = 0; l < 32; ++l) {
        Thread& t = lane_of(w, l);
        if (!runnable && t.wait == Wait::kWarp) t.wait = Wait::kNone;  // every live lane waits there: release
        if (t.wait != Wait::kNone) continue;
        cur = &t;
#ifdef EMU_ASAN
        __sanitizer_start_switch_fiber(&scheduler_fake_stack, t.stack, kStackBytes);
#endif
        emu_switch_context(&scheduler_sp, t.sp);
#ifdef EMU_ASAN
        __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
        cur = nullptr;
      }
    }
    if (progressed) continue;
    int done = 0, at_block = 0;
    for (auto& t : b.threads) {
      done += t.wait == Wait::kDone;
      at_block += t.wait == Wait::kBlock;
    }
    if (done == n) return;
    if (at_block + done == n) {
      for (auto& t : b.threads)
        if (t.wait == Wait::kBlock) t.wait = Wait::kNone;
      continue;
    }
    fail("deadlock: threads wait at a __syncwarp/shuffle/WMMA barrier that part of their warp never reaches, "
         "or at __syncthreads while others wait at a warp barrier");
    return;
  }
}

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A... args) {
  errors = 0;
  first_error.clear();
  const long nt = long(block.x) * block.y * block.z;
  const long total = long(grid.x) * grid.y * grid.z;
  std::string bad;
  if (total == 0 || nt == 0) bad = "invalid configuration: empty grid or block";
  else if (grid.y > 65535 || grid.z > 65535) bad = "grid y or z above 65535";
  else if (grid.x > 2147483647u) bad = "grid x above 2^31 - 1";
  else if (nt > 1024) bad = "block of " + std::to_string(nt) + " threads (at most 1024)";
  else if (nt % 32) bad = "block of " + std::to_string(nt) + " threads, not whole warps";
  else if (smem > 48 * 1024) {
    std::lock_guard<std::mutex> g(attr_mu);
    auto it = smem_attr.find(reinterpret_cast<const void*>(kernel));
    if (it == smem_attr.end() || size_t(it->second) < smem)
      bad = std::to_string(smem) + " bytes of dynamic shared memory without the opt-in attribute";
  }
  if (bad.empty() && smem > size_t(optin())) bad = std::to_string(smem) + " bytes of dynamic shared memory";
  if (!bad.empty()) throw std::runtime_error("emulated launch: " + bad);

  std::unique_ptr<unsigned char, void (*)(void*)> dyn(nullptr, std::free);
  if (smem) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, smem)) throw std::bad_alloc();
    dyn.reset(static_cast<unsigned char*>(p));
  }
  static const bool reverse = std::getenv("EMU_ORDER") && std::string(std::getenv("EMU_ORDER")) == "reverse";
  std::function<void()> body = [&]() { kernel(args...); };
  kernel_body = &body;
  Block b;
  b.grid = grid;
  b.block = block;
  b.nthreads = int(nt);
  b.dynamic = dyn.get();
  b.dynamic_bytes = smem;
  b.threads.resize(nt);
  struct Stack {
    void* base;
    size_t dirty;  // (ASan) bytes below its top that a previous thread may have left poisoned
  };
  static thread_local std::vector<Stack> stacks;  // kept from launch to launch
  while (long(stacks.size()) < nt) {
    void* p = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || mprotect(p, kGuardBytes, PROT_NONE)) throw std::bad_alloc();
    stacks.push_back({static_cast<char*>(p) + kGuardBytes, 0});
  }
  for (long t = 0; t < nt; ++t) {  // what a thread keeps from block to block
    Thread& th = b.threads[t];
    th.blk = &b;
    th.tid = make_uint3(unsigned(t % block.x), unsigned(t / block.x % block.y),
                        unsigned(t / (long(block.x) * block.y)));
    th.linear = int(t);
    th.stack = stacks[t].base;
  }
  for (long i = 0; i < total && !errors.load(); ++i) {
    b.idx = dim3(unsigned(i % grid.x), unsigned(i / grid.x % grid.y), unsigned(i / (long(grid.x) * grid.y)));
    b.warp_alive.assign(nt / 32, 32);
    b.exited = 0;
    b.shfl.assign(nt, 0);
    b.statics.clear();
    if (b.dynamic) std::memset(b.dynamic, kGarbage, smem);
#ifdef EMU_ASAN
    for (long t = 0; t < nt; ++t) {  // a stack's shadow must be clean before a new thread starts on it
      ASAN_UNPOISON_MEMORY_REGION(static_cast<char*>(stacks[t].base) + kStackBytes - stacks[t].dirty,
                                  stacks[t].dirty);
      stacks[t].dirty = kStackBytes;  // until it is known to have returned
    }
#endif
    for (long t = 0; t < nt; ++t) {
      Thread& th = b.threads[t];
      th.wait = Wait::kNone;
      th.open.clear();
      th.committed.clear();
      th.sp = new_fiber_stack(th.stack);
    }
    run_block(b, reverse);
    // A thread that returned left poisoned only its last two frames (thread_entry's, yield_to_scheduler's)
    // at the top, where new_fiber_stack writes next; deeper stale poison is harmless, as every instrumented
    // frame rewrites its own shadow on entry. One abandoned mid-kernel (a failed block): anything.
    for (long t = 0; t < nt; ++t) stacks[t].dirty = b.threads[t].wait == Wait::kDone ? 4096 : kStackBytes;
  }
  if (errors.load()) {
    const std::string what = first_error;
    errors = 0;
    throw std::runtime_error("emulated kernel, block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) +
                             ", " + std::to_string(b.idx.z) + "): " + what);
  }
}

// A CUDA thread's life: run the kernel, check what it left behind, mark it returned, hand control back
// (for good: the scheduler never resumes a returned thread).
extern "C" inline void emu_thread_entry() {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_stack, &scheduler_stack_size);
#endif
  (*kernel_body)();
  if (!cur->open.empty() || !cur->committed.empty()) fail("cp.async copies still pending when a thread returned");
  Block* b = cur->blk;
  b->exited++;
  b->warp_alive[warp()]--;
  cur->wait = Wait::kDone;
  yield_to_scheduler(true);
}

}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::cur->blk->idx)
#define blockDim (emu::cur->blk->block)
#define gridDim (emu::cur->blk->grid)
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) { return emu::shuffle(mask, v, lane_mask, true); }
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) { return emu::shuffle(mask, v, src_lane, false); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::isfinite;
using std::max;
using std::min;
// Launch errors are thrown by emu::launch itself, so the kernels' own checks see success.
#define cudaGetLastError() cudaSuccess
#define cudaGetErrorString(e) "emulated CUDA error"
#define cudaFuncSetAttribute(kernel, attr, bytes) \
  emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), (bytes))
#define cudaGetDevice(p) (*(p) = 0, cudaSuccess)
#define cudaDeviceGetAttribute(p, attr, device) (*(p) = emu::optin(), cudaSuccess)
