// The emulated device: clusters of blocks run one after another (a plain launch has clusters of
// one block), the threads of all blocks of a cluster are fibers of the calling OS thread. A
// thread runs until it reaches a barrier or a shuffle; the last one to arrive completes it (every
// participant checked: same barrier, same mask, no exited lane; the predicates of a
// __syncthreads_count counted) and the others become runnable again. Shuffles follow PTX's
// shfl.sync lane arithmetic. Switching fibers is a few instructions on x86-64 (swapcontext would
// make a system call for the signal mask at every switch, a hundred times slower); ucontext
// elsewhere.
#include "emulator.h"

#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <bit>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <sstream>
#include <stdexcept>
#include <tuple>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = size_t(256) << 10;
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kPoison = 0xff;  // NaN in every floating-point type
constexpr unsigned char kGuard = 0xa5;
// Shared memory (static + dynamic) a kernel may have unless it opted in to more with
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n).
constexpr size_t kDefaultSharedLimit = 48 << 10;
// The most blocks a cluster may have without cudaFuncAttributeNonPortableClusterSizeAllowed, which
// the kernels never set.
constexpr unsigned kMaxClusterBlocks = 8;
// Occupancy (max_active_clusters): the shared memory the driver reserves per block on sm_80 on
// (cudaDeviceProp::reservedSharedMemPerBlock), the most blocks and threads a multiprocessor holds
// (sm_90), and what a kernel's static shared memory is taken to be before it has been launched.
constexpr size_t kReservedSharedPerBlock = 1 << 10;
constexpr size_t kMaxBlocksPerSm = 32;
constexpr size_t kMaxThreadsPerSm = 2048;
constexpr size_t kUnknownStaticShared = 8 << 10;

enum class State { Runnable, AtBlockBarrier, AtClusterBarrier, AtWarpBarrier, Done };

#if defined(__x86_64__)
// The callee-saved registers, MXCSR and the x87 control word of the System V ABI, on the stack.
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

// A context that starts entry() (which must never return) on the stack below `top`.
void make_context(Context& c, void* top, void (*entry)()) {
  auto* frame = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
  frame -= 2;  // entry() sees rsp + 8 aligned to 16, as after a call; its "return address" is 0
  frame[0] = reinterpret_cast<uint64_t>(entry);
  frame[1] = 0;
  frame -= 7;  // MXCSR + x87 control word, then r15, r14, r13, r12, rbx, rbp
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  std::memset(frame, 0, 7 * sizeof(uint64_t));
  std::memcpy(frame, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(frame) + 4, &fpu_cw, 2);
  c.sp = frame;
}

void switch_context(Context& from, const Context& to) { cuda_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, void* top, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = static_cast<char*>(top) - kStackBytes;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// A warp-level operation a thread waits in: __syncwarp (is_shuffle false) or a shuffle.
struct WarpOp {
  bool is_shuffle = false;
  ShuffleKind kind = ShuffleKind::Idx;
  unsigned mask = 0;
  int lane_arg = 0;
  int width = 32;
  uint64_t value = 0;
  Site site;
};

struct Thread {
  Context context;
  State state = State::Runnable;
  Site barrier_site;             // of the block or cluster barrier it waits at
  bool block_predicate = false;  // its __syncthreads_count's predicate (false at __syncthreads)
  int block_count = 0;           // what the block barrier it was released from returns
  WarpOp op;
  uint64_t result = 0;
};

// A fiber's stack with a PROT_NONE page below it, so that an overflow faults at once.
class Stack {
 public:
  Stack() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    base_ = mmap(nullptr, kStackBytes + page_, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base_ == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a fiber stack");
    mprotect(base_, page_, PROT_NONE);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base_, kStackBytes + page_); }
  void* top() const { return static_cast<char*>(base_) + page_ + kStackBytes; }

 private:
  void* base_;
  size_t page_;
};

// A buffer of emulated shared memory with guard bytes after it.
struct SharedBuffer {
  std::unique_ptr<unsigned char[]> storage;
  unsigned char* data = nullptr;
  size_t bytes = 0;

  void allocate(size_t n, size_t align) {
    bytes = n;
    storage.reset(new unsigned char[n + kGuardBytes + align + 128]);
    const auto address = reinterpret_cast<uintptr_t>(storage.get());
    const size_t alignment = std::max<size_t>(align, 128);
    data = storage.get() + (alignment - address % alignment) % alignment;
  }
  void poison() {
    std::memset(data, kPoison, bytes);
    std::memset(data + bytes, kGuard, kGuardBytes);
  }
  bool guard_intact() const {
    for (size_t i = 0; i < kGuardBytes; ++i) {
      if (data[bytes + i] != kGuard) return false;
    }
    return true;
  }
  bool holds(const void* p) const {
    const auto address = reinterpret_cast<uintptr_t>(p), start = reinterpret_cast<uintptr_t>(data);
    return address >= start && address - start < bytes;
  }
};

struct Kernel {
  void (*body)(void*);
  void* context;
};

// Everything about the device, the launch and the cluster that runs now.
struct Emulator {
  int num_sms = 0;
  size_t shared_per_sm = 0;
  size_t shared_limit = kDefaultSharedLimit;
  bool clusters = false;
  Schedule schedule = Schedule::Forward;
  cudaError_t last_error = cudaSuccess;
  std::string error;  // the first kernel error (sticky)
  // What the launch that made `error` reports: cudaErrorInvalidValue where the launch was refused
  // (shared memory over its limits), else cudaErrorLaunchFailure.
  cudaError_t error_code = cudaErrorLaunchFailure;
  std::vector<LaunchRecord> records;
  std::map<const void*, int> max_dynamic_shared;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  std::map<const void*, size_t> static_shared_of;  // a kernel's static size, as its launch found
  std::vector<std::unique_ptr<Stack>> stacks;

  // The running launch.
  LaunchRecord* record = nullptr;
  const void* entry = nullptr;  // the kernel function, as cudaFuncSetAttribute names it
  Kernel kernel{};
  int cluster = 1;  // blocks per cluster
  int block_threads = 0;
  int block_warps = 0;
  // Per block rank of the cluster: the dynamic buffer, and each __shared__ variable's buffers.
  std::vector<SharedBuffer> dynamic_shared;
  std::map<std::tuple<std::type_index, std::string, int>, std::vector<SharedBuffer>> static_shared;
  size_t static_shared_sum = 0;  // bytes of one block's static_shared buffers

  // The running cluster: its threads block after block (a thread's index here is its gid), its
  // warps block after block (none spans two blocks).
  uint3 first_block{};  // blockIdx of its block of rank 0
  std::vector<Thread> threads;
  std::vector<unsigned> warp_live;  // live lanes per warp, a bit each
  std::vector<int> warp_arrived;    // lanes waiting in a warp operation, per warp
  std::vector<int> block_live;      // live threads per block
  std::vector<int> at_block_barrier;  // threads waiting at a __syncthreads, per block
  int live = 0;
  int at_cluster_barrier = 0;
  int current = -1;
  bool failed = false;
  Context scheduler;
};

Emulator& emu() {
  static Emulator instance;
  return instance;
}

std::string where(const Site& site) {
  std::ostringstream out;
  out << site.file_name() << ":" << site.line();
  return out.str();
}

bool same_site(const Site& a, const Site& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         std::strcmp(a.file_name(), b.file_name()) == 0;
}

// Where thread `gid` of the running cluster is: its block's rank, its index in the block, its warp
// (of the cluster's) and its lane.
int rank_of(int gid) { return gid / emu().block_threads; }
int tid_of(int gid) { return gid % emu().block_threads; }
int warp_of(int gid) { return rank_of(gid) * emu().block_warps + tid_of(gid) / 32; }
int lane_of(int gid) { return tid_of(gid) % 32; }
int first_of_warp(int warp) {
  const Emulator& e = emu();
  return warp / e.block_warps * e.block_threads + warp % e.block_warps * 32;
}
int lane_count(int warp) {
  return std::min(32, emu().block_threads - warp % emu().block_warps * 32);
}

std::span<Thread> block_of_rank(int rank) {
  Emulator& e = emu();
  return std::span(e.threads).subspan(static_cast<size_t>(rank) * e.block_threads,
                                      e.block_threads);
}

// The built-in variables of thread `gid`, before the scheduler switches to it.
void set_thread_index(int gid) {
  const Emulator& e = emu();
  const int tid = tid_of(gid);
  threadIdx.x = tid % blockDim.x;
  threadIdx.y = (tid / blockDim.x) % blockDim.y;
  threadIdx.z = tid / (blockDim.x * blockDim.y);
  blockIdx = e.first_block;
  blockIdx.x += rank_of(gid);
}

// "thread 5", or in a cluster of several blocks "block 2 thread 5".
std::string thread_name(int gid) {
  const Emulator& e = emu();
  const std::string thread = "thread " + std::to_string(tid_of(gid));
  if (e.cluster == 1) return thread;
  return "block " + std::to_string(e.first_block.x + rank_of(gid)) + " " + thread;
}

// Ends the running cluster, from inside a thread: the scheduler never resumes it.
[[noreturn]] void end_cluster() {
  Emulator& e = emu();
  e.failed = true;
  switch_context(e.threads[e.current].context, e.scheduler);
  std::abort();  // not reached
}

// Ends the running cluster with a kernel error, from inside a thread.
[[noreturn]] void fail(const std::string& message) {
  Emulator& e = emu();
  if (e.error.empty()) {
    std::ostringstream out;
    out << e.record->kernel << " in " << e.record->where << ", block (" << blockIdx.x << ","
        << blockIdx.y << "," << blockIdx.z << "), thread " << tid_of(e.current) << ": "
        << message;
    e.error = out.str();
    e.error_code = cudaErrorLaunchFailure;
  }
  end_cluster();
}

// Why a GPU would refuse to launch kernel `entry` with this much shared memory (static: of the
// __shared__ variables reached so far), or "" if it would not. The rules of the CUDA runtime:
// the dynamic size may not exceed the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, which
// is 48 KiB less the static size unless cudaFuncSetAttribute set it; cudaFuncSetAttribute refuses
// a value that with the static size exceeds the device's smem_per_block_optin; and no block has
// more than that. All refusals are cudaErrorInvalidValue.
std::string shared_memory_refusal(const void* entry, size_t static_bytes, size_t dynamic_bytes) {
  const Emulator& e = emu();
  const size_t total = static_bytes + dynamic_bytes;
  const auto attribute = e.max_dynamic_shared.find(entry);
  const std::string sizes =
      static_bytes == 0 ? std::to_string(dynamic_bytes) + " bytes of dynamic shared memory"
                        : std::to_string(dynamic_bytes) + " bytes of dynamic and " +
                              std::to_string(static_bytes) + " of static shared memory (" +
                              std::to_string(total) + ")";
  if (attribute == e.max_dynamic_shared.end()) {
    if (total > kDefaultSharedLimit) {
      return sizes + ", more than the " + std::to_string(kDefaultSharedLimit) +
             " a kernel may have without cudaFuncSetAttribute(kernel, "
             "cudaFuncAttributeMaxDynamicSharedMemorySize, >= " +
             std::to_string(dynamic_bytes) + "), which was not called for this kernel";
    }
  } else {
    const size_t allowed = static_cast<size_t>(attribute->second);
    if (dynamic_bytes > allowed) {
      return sizes + ", more dynamic than the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (" +
             std::to_string(allowed) + ")";
    }
    if (allowed + static_bytes > e.shared_limit) {
      return sizes + ": cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, " +
             std::to_string(allowed) + ") fails where that plus the static size exceeds the "
             "device's smem_per_block_optin (" + std::to_string(e.shared_limit) + ")";
    }
  }
  if (total > e.shared_limit) {
    return sizes + ", more than the device's smem_per_block_optin (" +
           std::to_string(e.shared_limit) + ")";
  }
  return "";
}

// Switches back to the scheduler until this thread is released.
void wait() {
  Emulator& e = emu();
  const int self = e.current;
  switch_context(e.threads[self].context, e.scheduler);
}

// Fails the kernel unless all `threads` in `state` wait at the same call site; `what` begins the
// message ("threads of the block wait at different __syncthreads").
void check_one_site(std::span<const Thread> threads, State state, const char* what) {
  const Site* first = nullptr;
  for (const Thread& t : threads) {
    if (t.state != state) continue;
    if (first == nullptr) {
      first = &t.barrier_site;
    } else if (!same_site(*first, t.barrier_site)) {
      fail(std::string(what) + ": " + where(*first) + " and " + where(t.barrier_site));
    }
  }
}

void complete_block_barrier_if_ready(int rank) {
  Emulator& e = emu();
  if (e.at_block_barrier[rank] == 0 || e.at_block_barrier[rank] < e.block_live[rank]) return;
  const std::span<Thread> block = block_of_rank(rank);
  check_one_site(block, State::AtBlockBarrier,
                 "threads of the block wait at different __syncthreads");
  int count = 0;  // what __syncthreads_count returns
  for (const Thread& t : block) count += t.state == State::AtBlockBarrier && t.block_predicate;
  for (Thread& t : block) {
    if (t.state != State::AtBlockBarrier) continue;
    t.block_count = count;
    t.state = State::Runnable;
  }
  e.at_block_barrier[rank] = 0;
  ++e.record->block_barriers;
}

void complete_cluster_barrier_if_ready() {
  Emulator& e = emu();
  if (e.at_cluster_barrier == 0 || e.at_cluster_barrier < e.live) return;
  check_one_site(e.threads, State::AtClusterBarrier,
                 "threads of the cluster wait at different cluster barriers (cluster.sync())");
  for (Thread& t : e.threads) {
    if (t.state == State::AtClusterBarrier) t.state = State::Runnable;
  }
  e.at_cluster_barrier = 0;
  ++e.record->cluster_barriers;
}

// The source lane of `lane` in a shuffle, by PTX's shfl.sync rules (c = the clamp operand that
// __shfl*_sync derive from width); -1 where the lane keeps its own value.
int shuffle_source(const WarpOp& op, int lane) {
  const int seg_mask = (32 - op.width) & 31;
  const int c = op.kind == ShuffleKind::Up ? 0 : 31;
  const int b = op.lane_arg & 31;
  const int max_lane = (lane & seg_mask) | (c & ~seg_mask);
  const int min_lane = lane & seg_mask;
  int j = lane;
  bool in_range = true;
  switch (op.kind) {
    case ShuffleKind::Up:
      j = lane - b;
      in_range = j >= max_lane;
      break;
    case ShuffleKind::Down:
      j = lane + b;
      in_range = j <= max_lane;
      break;
    case ShuffleKind::Xor:
      j = lane ^ b;
      in_range = j <= max_lane;
      break;
    case ShuffleKind::Idx:
      j = min_lane | (b & ~seg_mask);
      in_range = j <= max_lane;
      break;
  }
  return in_range ? j : -1;
}

// Completes the warp operation of the lanes in `mask` if all of them have arrived.
void complete_warp_op_if_ready(int warp, unsigned mask) {
  Emulator& e = emu();
  if (mask & ~e.warp_live[warp]) {
    fail("the mask of a warp operation names lanes that have exited or do not exist: " +
         std::to_string(mask & ~e.warp_live[warp]));
  }
  if (e.warp_arrived[warp] < std::popcount(mask)) return;  // not all there yet
  const int first_tid = first_of_warp(warp);
  const WarpOp* op = nullptr;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    const Thread& t = e.threads[first_tid + lane];
    if (t.state != State::AtWarpBarrier) return;  // not yet (others are in another operation)
    if (op == nullptr) {
      op = &t.op;
      continue;
    }
    if (t.op.mask != op->mask || t.op.is_shuffle != op->is_shuffle) {
      fail("lanes of warp " + std::to_string(warp) + " are in different warp operations: " +
           where(op->site) + " and " + where(t.op.site));
    }
    if (op->is_shuffle && (t.op.kind != op->kind || t.op.width != op->width ||
                           !same_site(t.op.site, op->site))) {
      fail("lanes of warp " + std::to_string(warp) + " are in different shuffles: " +
           where(op->site) + " and " + where(t.op.site));
    }
  }
  if (op == nullptr) return;
  if (op->is_shuffle) {
    for (int lane = 0; lane < 32; ++lane) {
      if (!(mask >> lane & 1u)) continue;
      Thread& t = e.threads[first_tid + lane];
      const int source = shuffle_source(t.op, lane);
      if (source < 0) {
        t.result = t.op.value;
      } else if (!(mask >> source & 1u)) {
        fail("lane " + std::to_string(lane) + " reads lane " + std::to_string(source) +
             ", which is not in the shuffle's mask, at " + where(t.op.site));
      } else {
        t.result = e.threads[first_tid + source].op.value;
      }
    }
    ++e.record->shuffles;
  } else {
    ++e.record->warp_barriers;
  }
  for (int lane = 0; lane < 32; ++lane) {
    if (mask >> lane & 1u) e.threads[first_tid + lane].state = State::Runnable;
  }
  e.warp_arrived[warp] -= std::popcount(mask);
}

void warp_op(const WarpOp& op) {
  Emulator& e = emu();
  const int self = e.current;
  const int lane = lane_of(self);
  if (!(op.mask >> lane & 1u)) {
    fail("a lane calls a warp operation whose mask leaves it out, at " + where(op.site));
  }
  if (op.width < 1 || op.width > 32 || (op.width & (op.width - 1)) != 0) {
    fail("shuffle width " + std::to_string(op.width) + " is not a power of two <= 32");
  }
  Thread& t = e.threads[self];
  t.op = op;
  t.state = State::AtWarpBarrier;
  ++e.warp_arrived[warp_of(self)];
  complete_warp_op_if_ready(warp_of(self), op.mask);
  if (t.state != State::Runnable) wait();
}

// Whether a block that has ended wrote past its shared memory (a kernel error), then poisons that
// memory: another block of the cluster that reads it after (undefined on a GPU) reads NaN.
void block_ends(int rank) {
  Emulator& e = emu();
  if (e.error.empty() && !e.dynamic_shared[rank].guard_intact()) {
    e.error = e.record->kernel + ": a block wrote past its " +
              std::to_string(e.record->dynamic_shared_bytes) + " bytes of dynamic shared memory";
    e.error_code = cudaErrorLaunchFailure;
  }
  for (const auto& [key, buffers] : e.static_shared) {
    if (e.error.empty() && !buffers[rank].guard_intact()) {
      e.error = e.record->kernel + ": a block wrote past the __shared__ variable " +
                std::get<1>(key) + ":" + std::to_string(std::get<2>(key));
      e.error_code = cudaErrorLaunchFailure;
    }
  }
  if (!e.error.empty()) e.failed = true;
  e.dynamic_shared[rank].poison();
  for (auto& [key, buffers] : e.static_shared) buffers[rank].poison();
}

void thread_exits() {
  Emulator& e = emu();
  const int self = e.current;
  const int rank = rank_of(self);
  e.threads[self].state = State::Done;
  --e.live;
  --e.block_live[rank];
  const int warp = warp_of(self);
  e.warp_live[warp] &= ~(1u << lane_of(self));
  // A lane waiting for this one in a warp operation would wait forever.
  for (int lane = 0; lane < lane_count(warp); ++lane) {
    const Thread& t = e.threads[first_of_warp(warp) + lane];
    if (t.state == State::AtWarpBarrier && (t.op.mask >> lane_of(self) & 1u)) {
      fail("exits while lane " + std::to_string(lane) + " waits for it at " + where(t.op.site));
    }
  }
  complete_block_barrier_if_ready(rank);
  complete_cluster_barrier_if_ready();
  if (e.block_live[rank] == 0) block_ends(rank);
}

[[noreturn]] void thread_main() {
  Emulator& e = emu();
  e.kernel.body(e.kernel.context);
  thread_exits();
  switch_context(e.threads[e.current].context, e.scheduler);
  std::abort();  // never resumed
}

std::string describe_waits() {
  std::ostringstream out;
  const Emulator& e = emu();
  for (size_t gid = 0; gid < e.threads.size(); ++gid) {
    const Thread& t = e.threads[gid];
    const std::string thread = " " + thread_name(static_cast<int>(gid));
    if (t.state == State::AtBlockBarrier) {
      out << thread << " at __syncthreads " << where(t.barrier_site) << ";";
    } else if (t.state == State::AtClusterBarrier) {
      out << thread << " at cluster.sync() " << where(t.barrier_site) << ";";
    } else if (t.state == State::AtWarpBarrier) {
      out << thread << " at a warp operation " << where(t.op.site) << ";";
    }
    if (out.tellp() > 600) break;
  }
  return out.str();
}

// Whether the schedule runs things last first.
bool reverse_schedule() {
  const Schedule s = emu().schedule;
  return s == Schedule::Reverse || s == Schedule::WarpsReverse || s == Schedule::BlocksReverse;
}

// The running cluster's threads in the schedule's first order: warp after warp (the cluster's last
// first, each last lane first, for the reverse schedules), and where each warp's end is in it.
struct Order {
  std::vector<int> threads;
  std::vector<size_t> warp_ends;
};

Order first_order() {
  const Emulator& e = emu();
  const bool reverse = reverse_schedule();
  const int warps = e.cluster * e.block_warps;
  Order order;
  for (int i = 0; i < warps; ++i) {
    const int warp = reverse ? warps - 1 - i : i;
    const int lanes = lane_count(warp);
    for (int lane = 0; lane < lanes; ++lane) {
      order.threads.push_back(first_of_warp(warp) + (reverse ? lanes - 1 - lane : lane));
    }
    order.warp_ends.push_back(order.threads.size());
  }
  return order;
}

// Fresh fibers for every thread of the running cluster, all runnable.
void start_threads() {
  Emulator& e = emu();
  const int threads = e.cluster * e.block_threads;
  const int warps = e.cluster * e.block_warps;
  while (static_cast<int>(e.stacks.size()) < threads) e.stacks.push_back(std::make_unique<Stack>());
  e.threads.assign(threads, Thread{});
  e.warp_live.assign(warps, 0);
  e.warp_arrived.assign(warps, 0);
  for (int gid = 0; gid < threads; ++gid) e.warp_live[warp_of(gid)] |= 1u << lane_of(gid);
  e.block_live.assign(e.cluster, e.block_threads);
  e.at_block_barrier.assign(e.cluster, 0);
  e.live = threads;
  e.at_cluster_barrier = 0;
  e.failed = false;
  for (int gid = 0; gid < threads; ++gid) {
    make_context(e.threads[gid].context, e.stacks[gid]->top(), thread_main);
  }
}

// Runs the cluster whose block of rank 0 is e.first_block to its end (or its first error).
void run_cluster() {
  Emulator& e = emu();
  start_threads();
  Order order = first_order();
  const bool by_warp = e.schedule == Schedule::WarpsForward || e.schedule == Schedule::WarpsReverse;
  const bool by_block =
      e.schedule == Schedule::BlocksForward || e.schedule == Schedule::BlocksReverse;
  const uint3 b = e.first_block;
  std::mt19937 random(b.x * 7919u + b.y * 104729u + b.z);
  // Runs each runnable thread of order.threads[begin, end) once; whether any ran.
  const auto sweep = [&](size_t begin, size_t end) {
    bool ran = false;
    for (size_t i = begin; i < end && !e.failed; ++i) {
      const int gid = order.threads[i];
      if (e.threads[gid].state != State::Runnable) continue;
      e.current = gid;
      set_thread_index(gid);
      switch_context(e.scheduler, e.threads[gid].context);
      ran = true;
    }
    return ran;
  };
  while (e.live > 0 && !e.failed) {
    if (e.schedule == Schedule::Shuffled) {
      std::shuffle(order.threads.begin(), order.threads.end(), random);
    }
    bool ran = false;
    if (by_warp || by_block) {  // a warp or a block at a time, as far as it goes
      size_t begin = 0;
      for (size_t w = 0; w < order.warp_ends.size(); ++w) {
        if (by_block && (w + 1) % e.block_warps != 0) continue;  // not a block's last warp
        const size_t end = order.warp_ends[w];
        while (sweep(begin, end)) ran = true;
        begin = end;
      }
    } else {
      ran = sweep(0, order.threads.size());
    }
    if (!ran && !e.failed) {
      std::ostringstream out;
      out << e.record->kernel << " in " << e.record->where << ", ";
      if (e.cluster == 1) {
        out << "block " << b.x;
      } else {
        out << "cluster of blocks " << b.x << ".." << b.x + e.cluster - 1;
      }
      out << ": deadlock, no thread can go on:" << describe_waits();
      e.error = out.str();
      e.error_code = cudaErrorLaunchFailure;
      e.failed = true;
    }
  }
  e.current = -1;
}

// Why a GPU would refuse the launch's cluster dimensions, and with what error, or "" if it would
// not. What the runtime returns for a cluster launch on a device without clusters is not
// documented; cudaErrorNotSupported here.
std::pair<cudaError_t, std::string> cluster_refusal(const LaunchConfig& config) {
  const Emulator& e = emu();
  const dim3 c = config.cluster;
  if (config.unsupported_attribute >= 0) {
    return {cudaErrorInvalidValue,
            "launch attribute " + std::to_string(config.unsupported_attribute) +
                " is not emulated (only cudaLaunchAttributeClusterDimension)"};
  }
  if (!config.cluster_attribute) return {cudaSuccess, ""};
  if (!e.clusters) {
    return {cudaErrorNotSupported, "a cluster launch on a device without thread-block clusters"};
  }
  if (c.y != 1 || c.z != 1) {
    return {cudaErrorNotSupported,
            "cluster dimensions (" + std::to_string(c.x) + "," + std::to_string(c.y) + "," +
                std::to_string(c.z) + "): the emulator supports 1-D clusters (y = z = 1) only"};
  }
  if (c.x < 1 || c.x > kMaxClusterBlocks || config.grid.x % c.x != 0) {
    return {cudaErrorInvalidClusterSize,
            "a cluster of " + std::to_string(c.x) + " blocks with " +
                std::to_string(config.grid.x) + " blocks in x: a cluster has 1 to " +
                std::to_string(kMaxClusterBlocks) + " blocks and divides the grid"};
  }
  return {cudaSuccess, ""};
}

// Allocates the launch's shared memory: one dynamic buffer per block of a cluster (the __shared__
// variables get theirs as the blocks reach them).
void allocate_shared(size_t dynamic_bytes) {
  Emulator& e = emu();
  e.dynamic_shared.resize(e.cluster);
  for (SharedBuffer& buffer : e.dynamic_shared) buffer.allocate(dynamic_bytes, 16);
  e.static_shared.clear();
  e.static_shared_sum = 0;
}

void poison_shared() {
  Emulator& e = emu();
  for (SharedBuffer& buffer : e.dynamic_shared) buffer.poison();
  for (auto& [key, buffers] : e.static_shared) {
    for (SharedBuffer& buffer : buffers) buffer.poison();
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// What the kernels call.

int syncthreads_count(int predicate, const Site& site) {
  Emulator& e = emu();
  Thread& t = e.threads[e.current];
  t.barrier_site = site;
  t.block_predicate = predicate != 0;
  t.state = State::AtBlockBarrier;
  const int rank = rank_of(e.current);
  ++e.at_block_barrier[rank];
  complete_block_barrier_if_ready(rank);
  if (t.state != State::Runnable) wait();
  return t.block_count;
}

void syncthreads(const Site& site) { syncthreads_count(0, site); }

void cluster_sync(const Site& site) {
  Emulator& e = emu();
  Thread& t = e.threads[e.current];
  t.barrier_site = site;
  t.state = State::AtClusterBarrier;
  ++e.at_cluster_barrier;
  complete_cluster_barrier_if_ready();
  if (t.state != State::Runnable) wait();
}

unsigned cluster_block_rank() { return static_cast<unsigned>(rank_of(emu().current)); }

unsigned cluster_blocks() { return static_cast<unsigned>(emu().cluster); }

void* map_shared_rank(const void* p, int rank, const Site& site) {
  Emulator& e = emu();
  if (rank < 0 || rank >= e.cluster) {
    fail("map_shared_rank to rank " + std::to_string(rank) + " in a cluster of " +
         std::to_string(e.cluster) + " blocks, at " + where(site));
  }
  const int own = rank_of(e.current);
  const auto offset = [p](const SharedBuffer& buffer) {
    return reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(buffer.data);
  };
  if (e.dynamic_shared[own].holds(p)) {
    return e.dynamic_shared[rank].data + offset(e.dynamic_shared[own]);
  }
  for (auto& [key, buffers] : e.static_shared) {
    if (buffers[own].holds(p)) return buffers[rank].data + offset(buffers[own]);
  }
  std::ostringstream out;
  out << "map_shared_rank of " << p << ", which is not in the block's shared memory, at "
      << where(site);
  fail(out.str());
}

void syncwarp(unsigned mask, const Site& site) {
  WarpOp op;
  op.mask = mask;
  op.site = site;
  warp_op(op);
}

uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t bits, int lane_arg, int width,
                 const Site& site) {
  WarpOp op;
  op.is_shuffle = true;
  op.kind = kind;
  op.mask = mask;
  op.lane_arg = lane_arg;
  op.width = width;
  op.value = bits;
  op.site = site;
  warp_op(op);
  return emu().threads[emu().current].result;
}

void threadfence() {}

void check_alignment(const void* p, size_t bytes, const Site& site) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::ostringstream out;
    out << "misaligned address " << p << " for a " << bytes << "-byte access at " << where(site);
    fail(out.str());
  }
}

void* dynamic_shared_memory() { return emu().dynamic_shared[rank_of(emu().current)].data; }

void* static_shared_memory(std::type_index type, const char* file, int line, size_t bytes,
                           size_t align) {
  Emulator& e = emu();
  auto [it, inserted] = e.static_shared.try_emplace({type, file, line});
  std::vector<SharedBuffer>& buffers = it->second;
  if (inserted) {
    buffers.resize(e.cluster);
    for (SharedBuffer& buffer : buffers) {
      buffer.allocate(bytes, align);
      buffer.poison();
    }
    // A kernel's static shared memory is the sum of its __shared__ variables rounded up to 16
    // bytes, where the dynamic shared memory starts: what ptxas reports for csrc's kernels (it
    // pads so in a module with extern __shared__; it may order the variables any way, so where
    // their alignments differ the sum is a lower bound). A GPU knows it before the launch; here
    // it grows as each variable is first reached, in any block, and a launch that a GPU would
    // refuse ends here as refused (what its blocks wrote so far is moot: the driver reports the
    // error, not the outputs). Every csrc kernel reaches all its variables in its first block,
    // before anything else (the split's finishing kernel: in the first block whose row is not
    // ignored). One difference from ptxas: a variable that is declared but never used counts
    // here, where ptxas drops it: the fixed-K kernel's one-element rows_smem where the row
    // statistics are in registers (16 or 32 bytes more than ptxas: 352 for K = 3 against 336);
    // no launch of csrc's has a dynamic size that close to the limit.
    e.static_shared_sum += bytes;
    e.record->static_shared_bytes = (e.static_shared_sum + 15) / 16 * 16;
    const std::string why = shared_memory_refusal(e.entry, e.record->static_shared_bytes,
                                                  e.record->dynamic_shared_bytes);
    if (!why.empty()) {
      if (e.error.empty()) {
        e.error = e.record->kernel + " in " + e.record->where +
                  ": the launch is refused (cudaErrorInvalidValue): " + why +
                  "; static size as of the __shared__ variable at " + file + ":" +
                  std::to_string(line);
        e.error_code = cudaErrorInvalidValue;
      }
      end_cluster();
    }
  }
  return buffers[rank_of(e.current)].data;
}

LaunchConfig::LaunchConfig(const cudaLaunchConfig_t& config)
    : LaunchConfig(config.gridDim, config.blockDim, config.dynamicSmemBytes, config.stream) {
  for (unsigned i = 0; i < config.numAttrs; ++i) {
    const cudaLaunchAttribute& attribute = config.attrs[i];
    if (attribute.id == cudaLaunchAttributeClusterDimension) {
      const auto& d = attribute.val.clusterDim;
      cluster = dim3(d.x, d.y, d.z);
      cluster_attribute = true;
    } else {
      unsupported_attribute = attribute.id;
    }
  }
}

cudaError_t run_grid(const char* where_launched, const char* kernel_name, const void* entry,
                     const LaunchConfig& config, void (*body)(void*), void* context) {
  Emulator& e = emu();
  e.records.push_back(LaunchRecord{where_launched, kernel_name, config.grid, config.block,
                                   config.cluster.x, config.shared_bytes});
  e.record = &e.records.back();
  e.entry = entry;
  const auto invalid = [&](cudaError_t code, const std::string& why) {
    e.last_error = code;
    if (e.error.empty()) {
      e.error = std::string(kernel_name) + " in " + where_launched + ": " + why;
      e.error_code = code;
    }
    return code;
  };
  if (!e.error.empty()) return e.error_code;  // a sticky error: nothing runs any more
  const dim3 g = config.grid, b = config.block;
  const long long threads = static_cast<long long>(b.x) * b.y * b.z;
  if (threads < 1 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64) {
    return invalid(cudaErrorInvalidConfiguration, "invalid block size");
  }
  if (g.x < 1 || g.y < 1 || g.z < 1 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    return invalid(cudaErrorInvalidConfiguration, "invalid grid size");
  }
  if (const auto [code, why] = cluster_refusal(config); code != cudaSuccess) {
    return invalid(code, "the launch is refused: " + why);
  }
  // The dynamic size alone; with the static one as the blocks reach it (static_shared_memory).
  const std::string why = shared_memory_refusal(entry, 0, config.shared_bytes);
  if (!why.empty()) {
    return invalid(cudaErrorInvalidValue, "the launch is refused (cudaErrorInvalidValue): " + why);
  }

  e.kernel = Kernel{body, context};
  e.cluster = static_cast<int>(config.cluster.x);
  e.block_threads = static_cast<int>(threads);
  e.block_warps = (e.block_threads + 31) / 32;
  allocate_shared(config.shared_bytes);
  gridDim = g;
  blockDim = b;
  // The reverse schedules also run the clusters last first: a GPU runs them in any order, and a
  // kernel that takes "the last block to finish" for the one of the highest index shows.
  const bool reverse = reverse_schedule();
  const unsigned clusters_x = g.x / config.cluster.x;
  for (unsigned z = 0; z < g.z && e.error.empty(); ++z) {
    for (unsigned y = 0; y < g.y && e.error.empty(); ++y) {
      for (unsigned x = 0; x < clusters_x && e.error.empty(); ++x) {
        const uint3 cluster = reverse ? uint3{clusters_x - 1 - x, g.y - 1 - y, g.z - 1 - z}
                                      : uint3{x, y, z};
        e.first_block = uint3{cluster.x * config.cluster.x, cluster.y, cluster.z};
        poison_shared();
        run_cluster();
      }
    }
  }
  e.static_shared_of[entry] = e.record->static_shared_bytes;
  e.record = nullptr;
  e.entry = nullptr;
  if (e.error.empty()) return cudaSuccess;
  e.last_error = e.error_code;
  // A refusal found as the blocks reached the static size is the launch's result; a kernel's
  // fault shows later, as on a GPU, where the launch itself succeeds.
  return e.error_code == cudaErrorLaunchFailure ? cudaSuccess : e.error_code;
}

void set_function_attribute(const void* entry, cudaFuncAttribute attribute, int value,
                            cudaError_t& result) {
  Emulator& e = emu();
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return;
  if (value < 0 || static_cast<size_t>(value) > e.shared_limit) {
    result = cudaErrorInvalidValue;
    return;
  }
  e.max_dynamic_shared[entry] = value;
}

// cudaOccupancyMaxActiveClusters, modelled on shared memory and threads alone (registers are
// ignored): a multiprocessor holds as many blocks as its shared memory has room for, each with the
// 1 KiB the driver reserves per block, at most 32 and at most 2048 threads; the device num_sms
// times that, in clusters. A GPU places a cluster's blocks within one GPC (about 16 to 18 SMs),
// which can leave some SMs unused; that is ignored. A cluster of more than 8 blocks, or dynamic
// shared memory a launch of the kernel would be refused, fits 0 times. The kernel's static size is
// what its last launch since configure() reached (a GPU knows it before any launch), or 8 KiB.
// Without clusters (before sm_90) an error, as is a configuration without the cluster size: what
// the runtime returns there is not documented.
cudaError_t max_active_clusters(int* clusters, const void* entry,
                                const cudaLaunchConfig_t& config) {
  const Emulator& e = emu();
  *clusters = 0;
  const LaunchConfig c(config);
  if (!e.clusters) return cudaErrorNotSupported;
  if (!c.cluster_attribute || c.unsupported_attribute >= 0) return cudaErrorInvalidValue;
  const size_t threads = static_cast<size_t>(c.block.x) * c.block.y * c.block.z;
  const size_t size = static_cast<size_t>(c.cluster.x) * c.cluster.y * c.cluster.z;
  if (threads < 1 || threads > 1024) return cudaErrorInvalidValue;
  if (size < 1) return cudaErrorInvalidClusterSize;
  const auto known = e.static_shared_of.find(entry);
  const size_t static_bytes = known != e.static_shared_of.end() ? known->second : 0;
  if (size > kMaxClusterBlocks ||
      !shared_memory_refusal(entry, static_bytes, c.shared_bytes).empty()) {
    return cudaSuccess;
  }
  const size_t block_bytes = c.shared_bytes + kReservedSharedPerBlock +
                             (known != e.static_shared_of.end() ? static_bytes
                                                                : kUnknownStaticShared);
  const size_t blocks_per_sm =
      std::min({kMaxBlocksPerSm, kMaxThreadsPerSm / threads, e.shared_per_sm / block_bytes});
  *clusters = static_cast<int>(static_cast<size_t>(e.num_sms) * blocks_per_sm / size);
  return cudaSuccess;
}

cudaError_t take_last_error() {
  const cudaError_t error = emu().last_error;
  emu().last_error = cudaSuccess;
  return error;
}

cudaError_t peek_last_error() { return emu().last_error; }

// ---------------------------------------------------------------------------------------------
// What the driver calls.

void configure(int num_sms, size_t shared_bytes_per_sm, size_t shared_bytes_per_block,
               bool clusters, Schedule schedule) {
  Emulator& e = emu();
  e.num_sms = num_sms;
  e.shared_per_sm = shared_bytes_per_sm;
  e.shared_limit = shared_bytes_per_block;
  e.clusters = clusters;
  e.schedule = schedule;
  e.max_dynamic_shared.clear();
  e.static_shared_of.clear();
}

const std::vector<LaunchRecord>& launches() { return emu().records; }

const std::string& kernel_error() { return emu().error; }

void reset() {
  Emulator& e = emu();
  e.records.clear();
  e.error.clear();
  e.error_code = cudaErrorLaunchFailure;
  e.last_error = cudaSuccess;
}

}  // namespace cuda_emu
