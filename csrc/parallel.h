// How the passes split work over threads and reach ahead of their memory streams (DESIGN.md
// section 6): task grains, the per-sample schedule with work stealing, software prefetch.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace scsa {

// How far ahead of a full-size NCHW stream its software prefetch reaches. Two streams come from
// memory, not L2: the pool's read of X (a sample's first touch) and apply_gates' write of out or
// dX (each line read for ownership first), whose loops stall on those accesses. 8 KiB ahead covers
// DRAM latency at the passes' rate; much shorter distances arrive late and longer ones no earlier.
// A prefetch never faults, so addresses past the tensor's end are harmless (computed as integers:
// no out-of-bounds pointer).
constexpr int64_t kPrefetchBytes = 8192;

// Prefetches the `bytes` starting kPrefetchBytes past p, to read (or to write: kWrite).
template <bool kWrite = false>
inline void prefetch_ahead(const void* p, int64_t bytes) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(p) + kPrefetchBytes;
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(reinterpret_cast<const void*>(ahead + k), kWrite, 3);
}

// Vector registers of the instruction set, for loops that size their accumulator blocks to fit.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// Channels per task in the channels_last passes: the vector loops run along C.
constexpr int64_t kChannelBlock = 64;
// Minimum elements of X per parallel task: below this, thread hand-off costs more than it saves.
constexpr int64_t kGrainElems = 16384;

inline int64_t grain(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, elems_per_item));
}

// f(b) for every sample b < B. Each thread owns a contiguous block of samples, as a fixed split
// would give it (the same samples every call: a block that fits that core's L2 stays there), and
// when its block is done it takes what is left of the others', one sample at a time: a fixed split
// alone waits on its slowest thread, and a thread slowed by anything else on its core would hold
// up the whole call. A sample's result does not depend on which thread computes it.
template <typename F>
void for_each_sample(int64_t B, const F& f) {
  const int64_t T = at::get_num_threads(), per = (B + T - 1) / T;
  std::vector<std::atomic<int64_t>> next(T);  // next[t]: the next unclaimed sample of block t
  for (int64_t t = 0; t < T; ++t) next[t] = t * per;
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < T; ++k) {
        const int64_t u = (t + k) % T, stop = std::min(B, (u + 1) * per);
        for (int64_t b = next[u]++; b < stop; b = next[u]++) f(b);
      }
  });
}

}  // namespace scsa
