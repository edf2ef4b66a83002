// The scheduler of the CUDA emulator (see cuda_emulator.h for the execution model).
#include "cuda_emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace hrgrad_cuda_emu {

Coordinates coordinates;

namespace {

// Limits of an sm_80 / sm_90 device (cudaDeviceProp of an H100: the emulated device).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimXY = 1024, kMaxBlockDimZ = 64;
constexpr unsigned kMaxGridDimX = 2147483647u, kMaxGridDimYZ = 65535;
constexpr size_t kSharedPerBlock = 48 * 1024;         // without the opt-in attribute
constexpr size_t kSharedPerBlockOptIn = 227 * 1024;   // cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr unsigned char kPoison = 0xFF;               // NaN as float / double, -1 as integer
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = 512 * 1024;  // ASan's red zones grow the frames
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

struct EmulationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ThreadExit {};  // unwinds a fiber whose thread a planted fault makes return early

std::string location(const std::source_location& where) {
  std::string file = where.file_name();
  for (const char* root : {"/csrc/", "/tests/"}) {  // repository-relative when possible
    const size_t p = file.rfind(root);
    if (p != std::string::npos) {
      file = file.substr(p + 1);
      break;
    }
  }
  return file + ":" + std::to_string(where.line());
}
bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}
std::string triple(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

// ---- fibers: a stack and a saved context -------------------------------------------------
// x86-64: a switch saves the callee-saved registers on the old stack and restores them from
// the new one (no system call, unlike swapcontext, whose signal-mask call made the emulation
// several times slower). The floating-point control state (MXCSR, x87 control word) is not
// switched: kernels do not change rounding modes, so every fiber shares the host's. Elsewhere:
// ucontext.
#if defined(__x86_64__)
extern "C" void hrgrad_cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .hidden hrgrad_cuda_emu_switch
  .type hrgrad_cuda_emu_switch, @function
hrgrad_cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size hrgrad_cuda_emu_switch, .-hrgrad_cuda_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { hrgrad_cuda_emu_switch(&from.sp, to.sp); }
// A context whose first switch "returns" into entry with the stack aligned as after a call.
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(stack, bytes);  // red zones of the frames a previous fiber left
#endif
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  *--top = 0;                                      // entry's (never used) return address
  *--top = reinterpret_cast<uint64_t>(entry);      // popped by the switch's ret
  for (int r = 0; r < 6; ++r) *--top = 0;          // rbp rbx r12 r13 r14 r15
  c.sp = top;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(stack, bytes);  // red zones of the frames a previous fiber left
#endif
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// Stacks are kept between launches; each has an inaccessible guard page below it, so an
// overflow faults instead of overwriting a neighbour.
class StackPool {
 public:
  char* get(size_t i) {
    while (stacks_.size() <= i) {
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
      mprotect(p, page, PROT_NONE);
      stacks_.push_back(static_cast<char*>(p) + page);
    }
    return stacks_[i];
  }

 private:
  std::vector<char*> stacks_;
};

// ---- the state of a launch and of its running block --------------------------------------

enum class State { runnable, at_barrier, at_warp_op, exited };

struct Fiber {
  Context context;
  char* stack = nullptr;
  uint3 thread_idx{};
  int lane = 0;
  State state = State::runnable;
  std::source_location where;  // the sync point it waits at
  WarpOp op = WarpOp::sync;
  const char* intrinsic = "";
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int src_lane = -1;
};

struct SharedBuffer {
  const void* site;
  size_t bytes;
  void* data;
};

struct Launch {
  std::string kernel;
  dim3 grid, block;
  size_t dynamic_bytes = 0, dynamic_limit = 0;
  void* dynamic = nullptr;
  std::vector<SharedBuffer> shared;
  size_t static_bytes = 0;
  uint3 block_idx{};
  std::vector<Fiber> fibers;
  size_t exited = 0, at_barrier = 0;  // threads of the running block in these states
  Fiber* current = nullptr;
  Context scheduler;
  std::exception_ptr error;
#if defined(__SANITIZE_ADDRESS__)
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
#endif

  ~Launch() {
    for (SharedBuffer& b : shared) ::operator delete(b.data, std::align_val_t(16));
    ::operator delete(dynamic, std::align_val_t(16));
  }
  std::string where_block() const {
    return "kernel " + kernel + ", block " + triple(block_idx.x, block_idx.y, block_idx.z);
  }
};

struct Plant {  // a bug planted at run time for the self-test
  enum Kind { skip_barrier, exit_before } kind;
  std::string file;  // suffix of the source file
  unsigned line;
  int first_lane;  // exit_before: lanes >= first_lane return before the sync point
};

struct Emulator {
  std::mutex mutex;
  StackPool stacks;
  Launch* launch = nullptr;
  int multiprocessors = 132;  // an H100 SXM
  std::string thread_order = "alternate";
  std::set<std::string> launched;
  std::map<std::string, size_t> dynamic_limits;  // kernels opted in to more dynamic shared memory
  std::vector<Plant> plants;
};
Emulator emulator;

inline Launch& running(const char* what) {
  Launch* l = emulator.launch;
  if (l == nullptr || l->current == nullptr) [[unlikely]] {
    throw EmulationError(std::string("hrgrad_cuda_emu: ") + what + " called outside a kernel");
  }
  return *l;
}

std::string thread_name(const Fiber& f) {
  return "thread " + triple(f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
}

// What a waiting thread is doing, for error messages.
std::string activity(const Fiber& f) {
  switch (f.state) {
    case State::exited:
      return "has exited";
    case State::at_barrier:
      return "waits at __syncthreads at " + location(f.where);
    case State::at_warp_op:
      return std::string("waits at ") + f.intrinsic + " at " + location(f.where);
    default:
      return "is running";
  }
}

[[noreturn]] void fail(const Launch& l, const std::string& what) {
  throw EmulationError("hrgrad_cuda_emu: " + l.where_block() + ": " + what);
}

const Plant* planted(Plant::Kind kind, const std::source_location& where) {
  if (emulator.plants.empty()) [[likely]] return nullptr;
  for (const Plant& p : emulator.plants) {
    const std::string file = where.file_name();
    if (p.kind == kind && p.line == where.line() && file.size() >= p.file.size() &&
        file.compare(file.size() - p.file.size(), p.file.size(), p.file) == 0) {
      return &p;
    }
  }
  return nullptr;
}

// ---- switching between the scheduler and the fibers ---------------------------------------

void fiber_entry();

void resume(Launch& l, Fiber& f) {
  l.current = &f;
  coordinates.thread_idx = f.thread_idx;
  coordinates.lane = f.lane;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
  switch_context(l.scheduler, f.context);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  switch_context(l.scheduler, f.context);
#endif
  l.current = nullptr;
}

void yield(Launch& l, bool exiting = false) {
  Fiber& f = *l.current;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, l.scheduler_stack, l.scheduler_stack_bytes);
  switch_context(f.context, l.scheduler);
  __sanitizer_finish_switch_fiber(fake, &l.scheduler_stack, &l.scheduler_stack_bytes);
#else
  (void)exiting;
  switch_context(f.context, l.scheduler);
#endif
}

std::function<void()> const* thread_body = nullptr;

void fiber_entry() {
  Launch& l = *emulator.launch;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
  try {
    (*thread_body)();
  } catch (const ThreadExit&) {
  } catch (...) {  // never unwind past a fiber's first frame: the scheduler rethrows
    if (!l.error) l.error = std::current_exception();
  }
  l.current->state = State::exited;
  ++l.exited;
  yield(l, /*exiting=*/true);
  __builtin_trap();  // an exited fiber is never resumed
}

// ---- resolving sync points ------------------------------------------------------------------

// Completes the warp operations of warp [w0, w1) whose lanes have all arrived. Returns
// whether any did.
bool release_warp_ops(Launch& l, int w0, int w1) {
  bool released = false;
  for (int i = w0; i < w1; ++i) {
    Fiber& f = l.fibers[i];
    if (f.state != State::at_warp_op) continue;
    bool complete = true;
    for (int j = w0; j < w1 && complete; ++j) {
      const Fiber& g = l.fibers[j];
      if (f.mask >> g.lane & 1u) {
        complete = g.state == State::at_warp_op && same_site(g.where, f.where) && g.mask == f.mask;
      }
    }
    if (!complete) continue;
    for (int j = w0; j < w1; ++j) {
      Fiber& g = l.fibers[j];
      if (!(f.mask >> g.lane & 1u)) continue;
      if (g.op == WarpOp::shuffle) {
        if (!(f.mask >> g.src_lane & 1u) || w0 + g.src_lane >= w1) {
          fail(l, thread_name(g) + " reads lane " + std::to_string(g.src_lane) + " with " + g.intrinsic + " at " +
                      location(g.where) + ", which is not in the mask");
        }
        g.result = l.fibers[w0 + g.src_lane].value;
      } else if (g.op == WarpOp::ballot) {
        uint64_t ballot = 0;
        for (int k = w0; k < w1; ++k) {
          if (f.mask >> l.fibers[k].lane & 1u) ballot |= l.fibers[k].value << l.fibers[k].lane;
        }
        g.result = ballot;
      }
    }
    for (int j = w0; j < w1; ++j) {
      if (f.mask >> l.fibers[j].lane & 1u) l.fibers[j].state = State::runnable;
    }
    released = true;
  }
  return released;
}

// Releases a barrier at which every thread of the block waits. Returns whether it did.
bool release_barrier(Launch& l) {
  if (l.at_barrier != l.fibers.size()) return false;
  for (const Fiber& f : l.fibers) {
    if (!same_site(f.where, l.fibers.front().where)) return false;
  }
  for (Fiber& f : l.fibers) f.state = State::runnable;
  l.at_barrier = 0;
  return true;
}

// No thread can go on: says why, as precisely as it can.
[[noreturn]] void report_deadlock(Launch& l) {
  const int n = static_cast<int>(l.fibers.size());
  for (int i = 0; i < n; ++i) {  // a warp operation that some lane of its mask cannot join
    const Fiber& f = l.fibers[i];
    if (f.state != State::at_warp_op) continue;
    const int w0 = i - f.lane;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      if (w0 + lane >= n) {
        fail(l, std::string("divergent ") + f.intrinsic + " at " + location(f.where) + ": the mask of " +
                    thread_name(f) + " names lane " + std::to_string(lane) + ", which the block does not have");
      }
      const Fiber& g = l.fibers[w0 + lane];
      if (g.state == State::at_warp_op && same_site(g.where, f.where) && g.mask == f.mask) continue;
      fail(l, std::string("divergent ") + f.intrinsic + " at " + location(f.where) + ": " + thread_name(f) +
                  " (lane " + std::to_string(f.lane) + ") waits with mask " + std::to_string(f.mask) + ", but " +
                  thread_name(g) + " (lane " + std::to_string(lane) + ") " + activity(g) +
                  (g.state == State::at_warp_op && g.mask != f.mask ? " with mask " + std::to_string(g.mask) : ""));
    }
  }
  const Fiber* waiting = nullptr;
  for (const Fiber& f : l.fibers) {
    if (f.state == State::at_barrier) {
      waiting = &f;
      break;
    }
  }
  if (waiting != nullptr) {
    for (const Fiber& f : l.fibers) {
      if (f.state == State::at_barrier && same_site(f.where, waiting->where)) continue;
      fail(l, "missing __syncthreads: " + thread_name(*waiting) + " waits at __syncthreads at " +
                  location(waiting->where) + ", but " + thread_name(f) + " " + activity(f));
    }
  }
  fail(l, "no thread can make progress");
}

// Warp by warp (in reverse order when `reverse`): each warp runs, completing its warp
// operations as its lanes arrive, until every lane waits at a barrier or has exited; then the
// next warp. When no warp can go on, the barrier is released if every thread waits at it.
void run_block(Launch& l, bool reverse) {
  const unsigned nx = l.block.x, ny = l.block.y;
  const int n = static_cast<int>(l.fibers.size()), warps = (n + 31) / 32;
  for (int i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    f.state = State::runnable;
    f.thread_idx = uint3{static_cast<unsigned>(i % nx), static_cast<unsigned>(i / nx % ny),
                         static_cast<unsigned>(i / (static_cast<size_t>(nx) * ny))};
    f.lane = i % 32;
    f.stack = emulator.stacks.get(i);
    make_context(f.context, f.stack, kStackBytes, fiber_entry);
  }
  l.exited = l.at_barrier = 0;
  for (SharedBuffer& b : l.shared) std::memset(b.data, kPoison, b.bytes);
  if (l.dynamic_bytes > 0) std::memset(l.dynamic, kPoison, l.dynamic_bytes);
  while (l.exited < l.fibers.size()) {
    for (int k = 0; k < warps; ++k) {
      const int w = reverse ? warps - 1 - k : k, w0 = 32 * w, w1 = std::min(n, w0 + 32);
      do {
        for (int lane = 0; lane < w1 - w0; ++lane) {
          Fiber& f = l.fibers[reverse ? w1 - 1 - lane : w0 + lane];
          if (f.state != State::runnable) continue;
          resume(l, f);
          if (l.error) std::rethrow_exception(l.error);
        }
      } while (release_warp_ops(l, w0, w1));
    }
    if (l.exited < l.fibers.size() && !release_barrier(l)) report_deadlock(l);
  }
}

[[noreturn]] void launch_failure(const Launch& l, const std::string& why) {
  throw EmulationError("CUDA kernel launch failed: " + l.kernel + " grid " + triple(l.grid.x, l.grid.y, l.grid.z) +
                       " block " + triple(l.block.x, l.block.y, l.block.z) + " " + std::to_string(l.dynamic_bytes) +
                       " bytes of dynamic shared memory: " + why + " (hrgrad_cuda_emu)");
}

void check_configuration(const Launch& l) {
  const dim3 g = l.grid, b = l.block;
  if (g.x == 0 || g.y == 0 || g.z == 0) launch_failure(l, "invalid configuration argument: a grid dimension is 0");
  if (g.x > kMaxGridDimX || g.y > kMaxGridDimYZ || g.z > kMaxGridDimYZ) {
    launch_failure(l, "invalid configuration argument: the grid exceeds (2147483647, 65535, 65535)");
  }
  const uint64_t threads = static_cast<uint64_t>(b.x) * b.y * b.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || b.x > kMaxBlockDimXY || b.y > kMaxBlockDimXY ||
      b.z > kMaxBlockDimZ) {
    launch_failure(l, "invalid configuration argument: a block has at most 1024 threads, (1024, 1024, 64)");
  }
  if (l.dynamic_bytes > l.dynamic_limit) {
    launch_failure(l, "invalid argument: more than " + std::to_string(l.dynamic_limit) +
                          " bytes of dynamic shared memory" +
                          (l.dynamic_limit == kSharedPerBlock
                               ? " without the opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize)"
                               : " (the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize)"));
  }
}

}  // namespace

// ---- the device API ---------------------------------------------------------------------------

void sync_threads(const std::source_location& where) {
  Launch& l = running("__syncthreads");
  if (const Plant* p = planted(Plant::exit_before, where); p && l.current->lane >= p->first_lane) throw ThreadExit{};
  if (planted(Plant::skip_barrier, where)) return;
  l.current->state = State::at_barrier;
  l.current->where = where;
  ++l.at_barrier;
  yield(l);
}

uint64_t warp_op(WarpOp op, const char* intrinsic, unsigned mask, uint64_t value, int src_lane,
                 const std::source_location& where) {
  Launch& l = running(intrinsic);
  Fiber& f = *l.current;
  if (const Plant* p = planted(Plant::exit_before, where); p && f.lane >= p->first_lane) throw ThreadExit{};
  if (!(mask >> f.lane & 1u)) {
    fail(l, thread_name(f) + " calls " + intrinsic + " at " + location(where) + " with mask " +
                std::to_string(mask) + ", which does not include its own lane " + std::to_string(f.lane));
  }
  f.state = State::at_warp_op;
  f.where = where;
  f.op = op;
  f.intrinsic = intrinsic;
  f.mask = mask;
  f.value = value;
  f.src_lane = src_lane;
  yield(l);
  return l.current->result;
}


void kernel_error(const std::string& what, const std::source_location& where) {
  Launch& l = running("kernel_error");
  fail(l, thread_name(*l.current) + " at " + location(where) + ": " + what);
}

void* shared_memory(const void* site, size_t bytes, size_t align) {
  Launch& l = running("a __shared__ declaration");
  for (const SharedBuffer& b : l.shared) {
    if (b.site == site) return b.data;
  }
  // The first thread of the launch to reach this declaration allocates it, with exactly its
  // size, so that AddressSanitizer sees accesses past its end. As on a device, static shared
  // memory is at most 48 KB, and with the dynamic part at most 48 KB, or the opt-in maximum
  // when the kernel opted in (its opt-in size counts then, not the launch's).
  l.static_bytes += bytes;
  const bool opted_in = l.dynamic_limit > kSharedPerBlock;
  const size_t dynamic = opted_in ? l.dynamic_limit : l.dynamic_bytes, total = opted_in ? kSharedPerBlockOptIn : kSharedPerBlock;
  if (l.static_bytes > kSharedPerBlock || l.static_bytes + dynamic > total) {
    launch_failure(l, std::to_string(l.static_bytes) + " bytes of static shared memory (" + std::to_string(dynamic) +
                          " dynamic) exceed the " + std::to_string(total) + " bytes of a block");
  }
  (void)align;  // operator new with 16-byte alignment covers every type a kernel shares
  void* data = ::operator new(bytes, std::align_val_t(16));
  std::memset(data, kPoison, bytes);
  l.shared.push_back({site, bytes, data});
  return data;
}

void* dynamic_shared() { return running("extern __shared__").dynamic; }

int multiprocessor_count() { return emulator.multiprocessors; }

void set_max_dynamic_shared_memory(const std::string& kernel, size_t bytes) {
  if (bytes > kSharedPerBlockOptIn) {
    throw EmulationError("cudaFuncSetAttribute(" + kernel + ", cudaFuncAttributeMaxDynamicSharedMemorySize, " +
                         std::to_string(bytes) + "): invalid argument (the device allows at most " +
                         std::to_string(kSharedPerBlockOptIn) + " bytes) (hrgrad_cuda_emu)");
  }
  std::lock_guard<std::mutex> lock(emulator.mutex);
  emulator.dynamic_limits[kernel] = bytes;
}

void run_launch(const std::string& kernel, dim3 grid, dim3 block, size_t dynamic_smem,
                const std::function<void()>& body) {
  Emulator& e = emulator;
  std::lock_guard<std::mutex> lock(e.mutex);
  Launch l;
  l.kernel = kernel;
  l.grid = grid;
  l.block = block;
  l.dynamic_bytes = dynamic_smem;
  const auto opt_in = e.dynamic_limits.find(kernel);
  l.dynamic_limit = opt_in == e.dynamic_limits.end() ? kSharedPerBlock : opt_in->second;
  check_configuration(l);
  e.launched.insert(kernel);
  l.dynamic = ::operator new(dynamic_smem, std::align_val_t(16));
  l.fibers.resize(static_cast<size_t>(block.x) * block.y * block.z);

  struct Restore {  // leaves the emulator idle whatever happens
    Emulator& e;
    ~Restore() {
      e.launch = nullptr;
      thread_body = nullptr;
    }
  } restore{e};
  e.launch = &l;
  thread_body = &body;
  coordinates.block_dim = block;
  coordinates.grid_dim = grid;
  uint64_t index = 0;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x, ++index) {
        l.block_idx = uint3{x, y, z};
        coordinates.block_idx = l.block_idx;
        const bool reverse = e.thread_order == "reverse" || (e.thread_order == "alternate" && index % 2 == 1);
        run_block(l, reverse);
      }
    }
  }
}

}  // namespace hrgrad_cuda_emu

// ---- control from the tests: torch.ops.hrgrad_cuda_emu ------------------------------------------

namespace {

void configure(int64_t multiprocessors, std::string thread_order) {
  TORCH_CHECK(multiprocessors >= 1, "hrgrad_cuda_emu.configure: multiprocessors must be >= 1");
  TORCH_CHECK(thread_order == "forward" || thread_order == "reverse" || thread_order == "alternate",
              "hrgrad_cuda_emu.configure: thread_order must be forward, reverse or alternate");
  auto& e = hrgrad_cuda_emu::emulator;
  std::lock_guard<std::mutex> lock(e.mutex);
  e.multiprocessors = static_cast<int>(multiprocessors);
  e.thread_order = thread_order;
}

std::vector<std::string> launched_kernels() {
  auto& e = hrgrad_cuda_emu::emulator;
  std::lock_guard<std::mutex> lock(e.mutex);
  return {e.launched.begin(), e.launched.end()};
}

void plant(std::string fault, std::string file, int64_t line, int64_t first_lane) {
  using hrgrad_cuda_emu::Plant;
  TORCH_CHECK(fault == "skip_barrier" || fault == "exit_before",
              "hrgrad_cuda_emu.plant: fault must be skip_barrier or exit_before");
  auto& e = hrgrad_cuda_emu::emulator;
  std::lock_guard<std::mutex> lock(e.mutex);
  e.plants.push_back(Plant{fault == "skip_barrier" ? Plant::skip_barrier : Plant::exit_before, file,
                           static_cast<unsigned>(line), static_cast<int>(first_lane)});
}

void clear_plants() {
  auto& e = hrgrad_cuda_emu::emulator;
  std::lock_guard<std::mutex> lock(e.mutex);
  e.plants.clear();
}

}  // namespace

TORCH_LIBRARY(hrgrad_cuda_emu, m) {
  m.def("configure(int multiprocessors=132, str thread_order=\"alternate\") -> ()", &configure);
  m.def("launched_kernels() -> str[]", &launched_kernels);
  m.def("plant(str fault, str file, int line, int first_lane=0) -> ()", &plant);
  m.def("clear_plants() -> ()", &clear_plants);
}
