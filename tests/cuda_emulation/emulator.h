// The emulated device as the driver (driver.cpp) sees it: its limits, the schedule of its threads,
// what ran, and the first error a kernel made.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "cuda_emulation.h"

namespace cuda_emu {

// The order in which the scheduler runs a block's runnable threads. Results of a race-free kernel
// do not depend on it; comparing two orders catches a missing barrier. Forward, Reverse and
// Shuffled (anew at every round, seeded by the block index) run every runnable thread once a
// round, so warps stay within one barrier of each other; WarpsForward and WarpsReverse run each
// warp as far as it goes (up to a __syncthreads or its end) before the next, so that one warp
// runs ahead of the others into whatever they have not finished reading. Reverse and WarpsReverse
// also run the grid's blocks last first.
enum class Schedule : int { Forward, Reverse, Shuffled, WarpsForward, WarpsReverse };

// Shared memory one block may have (static + dynamic), as DeviceInfo::smem_per_block_optin;
// forgets what cudaFuncSetAttribute set. A launch is refused (cudaErrorInvalidValue) as a GPU
// refuses it: static + dynamic over 48 KiB without cudaFuncAttributeMaxDynamicSharedMemorySize
// set to at least the dynamic size, or over this (emulator.cpp, shared_memory_refusal).
void configure(size_t shared_bytes_per_block, Schedule schedule);

struct LaunchRecord {
  std::string where;   // the launching function, with its template arguments
  std::string kernel;  // the kernel expression before <<<
  dim3 grid, block;
  size_t dynamic_shared_bytes = 0;
  size_t static_shared_bytes = 0;  // the __shared__ variables reached, summed, rounded to 16
  long long block_barriers = 0;  // __syncthreads(_count) episodes, summed over blocks
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
