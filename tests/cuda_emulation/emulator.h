// The emulated device as the driver (driver.cpp) sees it: its limits, the schedule of its threads,
// what ran, and the first error a kernel made.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace cuda_emu {

// The order in which the scheduler runs a cluster's runnable threads (those of all its blocks;
// a plain launch has clusters of one block). Results of a race-free kernel do not depend on it;
// comparing two orders catches a missing barrier. Forward, Reverse (the cluster's last block's
// threads first) and Shuffled (anew at every round, seeded by the index of the cluster's first
// block) run every runnable thread once a round, so warps stay within one barrier of each other;
// WarpsForward and WarpsReverse run each warp as far as it goes (up to a __syncthreads, a cluster
// barrier or its end) before the next, so that one warp runs ahead of the others into whatever
// they have not finished reading; BlocksForward and BlocksReverse run each block of a cluster as
// far as it goes (up to a cluster barrier or its end) before the next, its threads a round at a
// time, so that one block runs ahead of the others into whatever they have not finished writing
// or reading in its shared memory or theirs. The Reverse schedules also run the grid's clusters
// last first.
enum class Schedule : int {
  Forward,
  Reverse,
  Shuffled,
  WarpsForward,
  WarpsReverse,
  BlocksForward,
  BlocksReverse
};

// The device, as fastdml::gpu::DeviceInfo: its multiprocessors, their shared memory, what one
// block may have (static + dynamic, smem_per_block_optin) and whether it launches thread-block
// clusters (sm_90 on); forgets what cudaFuncSetAttribute set and the kernels' static sizes. A
// launch is refused (cudaErrorInvalidValue) as a GPU refuses it: static + dynamic over 48 KiB
// without cudaFuncAttributeMaxDynamicSharedMemorySize set to at least the dynamic size, or over
// shared_bytes_per_block (emulator.cpp, shared_memory_refusal).
void configure(int num_sms, size_t shared_bytes_per_sm, size_t shared_bytes_per_block,
               bool clusters, Schedule schedule);

struct LaunchRecord {
  std::string where;   // the launching function, with its template arguments
  std::string kernel;  // the kernel expression before <<<
  dim3 grid, block;
  unsigned cluster = 1;  // blocks per cluster (1 for a launch without clusters)
  size_t dynamic_shared_bytes = 0;
  size_t static_shared_bytes = 0;  // the __shared__ variables reached, summed, rounded to 16
  long long block_barriers = 0;  // __syncthreads(_count) episodes, summed over blocks
  long long cluster_barriers = 0;  // cluster.sync() episodes, summed over clusters
  long long warp_barriers = 0;   // __syncwarp episodes, summed over warps
  long long shuffles = 0;        // shuffle episodes, summed over warps
};

// Launches since the last reset(), in order.
const std::vector<LaunchRecord>& launches();

// The first error a kernel made (an invalid barrier or shuffle, a deadlock, shared memory written
// out of bounds), or "" if none. Launches after it do not run, as after a sticky CUDA error.
const std::string& kernel_error();

// Forgets the launches, the kernel error and the last error.
void reset();

}  // namespace cuda_emu
