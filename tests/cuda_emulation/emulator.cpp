// The emulated device: blocks run one after another, the threads of a block are fibers of the
// calling OS thread. A thread runs until it reaches a barrier or a shuffle; the last one to arrive
// completes it (every participant checked: same barrier, same mask, no exited lane; the predicates
// of a __syncthreads_count counted) and the others become runnable again. Shuffles follow PTX's
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
#include <numeric>
#include <random>
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

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

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
  Site block_site;
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
};

struct Kernel {
  void (*body)(void*);
  void* context;
};

// Everything about the launch and the block that run now.
struct Emulator {
  size_t shared_limit = kDefaultSharedLimit;
  Schedule schedule = Schedule::Forward;
  cudaError_t last_error = cudaSuccess;
  std::string error;  // the first kernel error (sticky)
  // What the launch that made `error` reports: cudaErrorInvalidValue where the launch was refused
  // (shared memory over its limits), else cudaErrorLaunchFailure.
  cudaError_t error_code = cudaErrorLaunchFailure;
  std::vector<LaunchRecord> records;
  std::map<const void*, int> max_dynamic_shared;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  std::vector<std::unique_ptr<Stack>> stacks;

  // The running launch.
  LaunchRecord* record = nullptr;
  const void* entry = nullptr;  // the kernel function, as cudaFuncSetAttribute names it
  Kernel kernel{};
  SharedBuffer dynamic_shared;
  std::map<std::tuple<std::type_index, std::string, int>, SharedBuffer> static_shared;
  size_t static_shared_sum = 0;  // bytes of the static_shared buffers

  // The running block.
  std::vector<Thread> threads;
  std::vector<unsigned> warp_live;  // live lanes per warp, a bit each
  std::vector<int> warp_arrived;    // lanes waiting in a warp operation, per warp
  int live = 0;
  int at_block_barrier = 0;
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

void set_thread_index(int tid) {
  threadIdx.x = tid % blockDim.x;
  threadIdx.y = (tid / blockDim.x) % blockDim.y;
  threadIdx.z = tid / (blockDim.x * blockDim.y);
}

// Ends the running block, from inside a thread: the scheduler never resumes it.
[[noreturn]] void end_block() {
  Emulator& e = emu();
  e.failed = true;
  switch_context(e.threads[e.current].context, e.scheduler);
  std::abort();  // not reached
}

// Ends the running block with a kernel error, from inside a thread.
[[noreturn]] void fail(const std::string& message) {
  Emulator& e = emu();
  if (e.error.empty()) {
    std::ostringstream out;
    out << e.record->kernel << " in " << e.record->where << ", block (" << blockIdx.x << ","
        << blockIdx.y << "," << blockIdx.z << "), thread " << e.current << ": " << message;
    e.error = out.str();
    e.error_code = cudaErrorLaunchFailure;
  }
  end_block();
}

// Why a GPU would refuse to launch the running kernel with this much shared memory (static: of
// the __shared__ variables reached so far), or "" if it would not. The rules of the CUDA runtime:
// the dynamic size may not exceed the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, which
// is 48 KiB less the static size unless cudaFuncSetAttribute set it; cudaFuncSetAttribute refuses
// a value that with the static size exceeds the device's smem_per_block_optin; and no block has
// more than that. All refusals are cudaErrorInvalidValue.
std::string shared_memory_refusal(size_t static_bytes, size_t dynamic_bytes) {
  const Emulator& e = emu();
  const size_t total = static_bytes + dynamic_bytes;
  const auto attribute = e.max_dynamic_shared.find(e.entry);
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

void complete_block_barrier_if_ready() {
  Emulator& e = emu();
  if (e.at_block_barrier == 0 || e.at_block_barrier < e.live) return;
  const Site* first = nullptr;
  int count = 0;  // what __syncthreads_count returns
  for (Thread& t : e.threads) {
    if (t.state != State::AtBlockBarrier) continue;
    count += t.block_predicate;
    if (first == nullptr) {
      first = &t.block_site;
    } else if (!same_site(*first, t.block_site)) {
      fail("threads of the block wait at different __syncthreads: " + where(*first) + " and " +
           where(t.block_site));
    }
  }
  for (Thread& t : e.threads) {
    if (t.state != State::AtBlockBarrier) continue;
    t.block_count = count;
    t.state = State::Runnable;
  }
  e.at_block_barrier = 0;
  ++e.record->block_barriers;
}

int lane_count(int warp) {
  return std::min(32, static_cast<int>(emu().threads.size()) - warp * 32);
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
  const int first_tid = warp * 32;
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
  const int lane = self % 32;
  if (!(op.mask >> lane & 1u)) {
    fail("a lane calls a warp operation whose mask leaves it out, at " + where(op.site));
  }
  if (op.width < 1 || op.width > 32 || (op.width & (op.width - 1)) != 0) {
    fail("shuffle width " + std::to_string(op.width) + " is not a power of two <= 32");
  }
  Thread& t = e.threads[self];
  t.op = op;
  t.state = State::AtWarpBarrier;
  ++e.warp_arrived[self / 32];
  complete_warp_op_if_ready(self / 32, op.mask);
  if (t.state != State::Runnable) wait();
}

void thread_exits() {
  Emulator& e = emu();
  const int self = e.current;
  e.threads[self].state = State::Done;
  --e.live;
  const int warp = self / 32;
  e.warp_live[warp] &= ~(1u << (self % 32));
  // A lane waiting for this one in a warp operation would wait forever.
  for (int lane = 0; lane < lane_count(warp); ++lane) {
    const Thread& t = e.threads[warp * 32 + lane];
    if (t.state == State::AtWarpBarrier && (t.op.mask >> (self % 32) & 1u)) {
      fail("exits while lane " + std::to_string(lane) + " waits for it at " + where(t.op.site));
    }
  }
  complete_block_barrier_if_ready();
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
  for (size_t tid = 0; tid < e.threads.size(); ++tid) {
    const Thread& t = e.threads[tid];
    if (t.state == State::AtBlockBarrier) {
      out << " thread " << tid << " at __syncthreads " << where(t.block_site) << ";";
    } else if (t.state == State::AtWarpBarrier) {
      out << " thread " << tid << " at a warp operation " << where(t.op.site) << ";";
    }
    if (out.tellp() > 600) break;
  }
  return out.str();
}

// Runs one block to its end (or its first error).
void run_block(int threads) {
  Emulator& e = emu();
  while (static_cast<int>(e.stacks.size()) < threads) e.stacks.push_back(std::make_unique<Stack>());
  e.threads.assign(threads, Thread{});
  e.warp_live.assign((threads + 31) / 32, 0);
  e.warp_arrived.assign((threads + 31) / 32, 0);
  for (int tid = 0; tid < threads; ++tid) e.warp_live[tid / 32] |= 1u << (tid % 32);
  e.live = threads;
  e.at_block_barrier = 0;
  e.failed = false;
  for (int tid = 0; tid < threads; ++tid) {
    make_context(e.threads[tid].context, e.stacks[tid]->top(), thread_main);
  }
  std::vector<int> order(threads);
  std::iota(order.begin(), order.end(), 0);
  const bool reverse = e.schedule == Schedule::Reverse || e.schedule == Schedule::WarpsReverse;
  const bool by_warp = e.schedule == Schedule::WarpsForward || e.schedule == Schedule::WarpsReverse;
  if (reverse) std::reverse(order.begin(), order.end());
  std::mt19937 random(blockIdx.x * 7919u + blockIdx.y * 104729u + blockIdx.z);
  // Runs each runnable thread of order[begin, end) once; whether any ran.
  const auto sweep = [&](size_t begin, size_t end) {
    bool ran = false;
    for (size_t i = begin; i < end && !e.failed; ++i) {
      const int tid = order[i];
      if (e.threads[tid].state != State::Runnable) continue;
      e.current = tid;
      set_thread_index(tid);
      switch_context(e.scheduler, e.threads[tid].context);
      ran = true;
    }
    return ran;
  };
  while (e.live > 0 && !e.failed) {
    if (e.schedule == Schedule::Shuffled) std::shuffle(order.begin(), order.end(), random);
    bool ran = false;
    if (by_warp) {  // order holds whole warps, one after another
      for (size_t begin = 0; begin < order.size(); begin += 32) {
        const size_t end = std::min(order.size(), begin + 32);
        while (sweep(begin, end)) ran = true;
      }
    } else {
      ran = sweep(0, order.size());
    }
    if (!ran && !e.failed) {
      std::ostringstream out;
      out << e.record->kernel << " in " << e.record->where << ", block " << blockIdx.x
          << ": deadlock, no thread can go on:" << describe_waits();
      e.error = out.str();
      e.error_code = cudaErrorLaunchFailure;
      e.failed = true;
    }
  }
  e.current = -1;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// What the kernels call.

int syncthreads_count(int predicate, const Site& site) {
  Emulator& e = emu();
  Thread& t = e.threads[e.current];
  t.block_site = site;
  t.block_predicate = predicate != 0;
  t.state = State::AtBlockBarrier;
  ++e.at_block_barrier;
  complete_block_barrier_if_ready();
  if (t.state != State::Runnable) wait();
  return t.block_count;
}

void syncthreads(const Site& site) { syncthreads_count(0, site); }

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

void* dynamic_shared_memory() { return emu().dynamic_shared.data; }

void* static_shared_memory(std::type_index type, const char* file, int line, size_t bytes,
                           size_t align) {
  Emulator& e = emu();
  auto [it, inserted] = e.static_shared.try_emplace({type, file, line});
  SharedBuffer& buffer = it->second;
  if (inserted) {
    buffer.allocate(bytes, align);
    buffer.poison();
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
    const std::string why =
        shared_memory_refusal(e.record->static_shared_bytes, e.record->dynamic_shared_bytes);
    if (!why.empty()) {
      if (e.error.empty()) {
        e.error = e.record->kernel + " in " + e.record->where +
                  ": the launch is refused (cudaErrorInvalidValue): " + why +
                  "; static size as of the __shared__ variable at " + file + ":" +
                  std::to_string(line);
        e.error_code = cudaErrorInvalidValue;
      }
      end_block();
    }
  }
  return buffer.data;
}

void run_grid(const char* where_launched, const char* kernel_name, const void* entry,
              const LaunchConfig& config, void (*body)(void*), void* context) {
  Emulator& e = emu();
  e.records.push_back(LaunchRecord{where_launched, kernel_name, config.grid, config.block,
                                   config.shared_bytes});
  e.record = &e.records.back();
  e.entry = entry;
  const auto invalid = [&](cudaError_t code, const std::string& why) {
    e.last_error = code;
    if (e.error.empty()) {
      e.error = std::string(kernel_name) + " in " + where_launched + ": " + why;
      e.error_code = code;
    }
  };
  if (!e.error.empty()) return;  // a sticky error: nothing runs any more
  const dim3 g = config.grid, b = config.block;
  const long long threads = static_cast<long long>(b.x) * b.y * b.z;
  if (threads < 1 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64) {
    return invalid(cudaErrorInvalidConfiguration, "invalid block size");
  }
  if (g.x < 1 || g.y < 1 || g.z < 1 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    return invalid(cudaErrorInvalidConfiguration, "invalid grid size");
  }
  // The dynamic size alone; with the static one as the blocks reach it (static_shared_memory).
  const std::string why = shared_memory_refusal(0, config.shared_bytes);
  if (!why.empty()) {
    return invalid(cudaErrorInvalidValue, "the launch is refused (cudaErrorInvalidValue): " + why);
  }

  e.kernel = Kernel{body, context};
  e.dynamic_shared.allocate(config.shared_bytes, 16);
  e.static_shared.clear();
  e.static_shared_sum = 0;
  gridDim = g;
  blockDim = b;
  // The reverse schedules also run the blocks last first: a GPU runs them in any order, and a
  // kernel that takes "the last block to finish" for the one of the highest index shows.
  const bool reverse = e.schedule == Schedule::Reverse || e.schedule == Schedule::WarpsReverse;
  for (unsigned z = 0; z < g.z && e.error.empty(); ++z) {
    for (unsigned y = 0; y < g.y && e.error.empty(); ++y) {
      for (unsigned x = 0; x < g.x && e.error.empty(); ++x) {
        blockIdx = reverse ? uint3{g.x - 1 - x, g.y - 1 - y, g.z - 1 - z} : uint3{x, y, z};
        e.dynamic_shared.poison();
        for (auto& [key, buffer] : e.static_shared) buffer.poison();
        run_block(static_cast<int>(threads));
        if (e.error.empty() && !e.dynamic_shared.guard_intact()) {
          e.error = std::string(kernel_name) + ": a block wrote past its " +
                    std::to_string(config.shared_bytes) + " bytes of dynamic shared memory";
          e.error_code = cudaErrorLaunchFailure;
        }
        for (auto& [key, buffer] : e.static_shared) {
          if (e.error.empty() && !buffer.guard_intact()) {
            e.error = std::string(kernel_name) + ": a block wrote past the __shared__ variable " +
                      std::get<1>(key) + ":" + std::to_string(std::get<2>(key));
            e.error_code = cudaErrorLaunchFailure;
          }
        }
      }
    }
  }
  if (!e.error.empty()) e.last_error = e.error_code;
  e.record = nullptr;
  e.entry = nullptr;
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

cudaError_t take_last_error() {
  const cudaError_t error = emu().last_error;
  emu().last_error = cudaSuccess;
  return error;
}

cudaError_t peek_last_error() { return emu().last_error; }

// ---------------------------------------------------------------------------------------------
// What the driver calls.

void configure(size_t shared_bytes_per_block, Schedule schedule) {
  emu().shared_limit = shared_bytes_per_block;
  emu().schedule = schedule;
  emu().max_dynamic_shared.clear();
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
