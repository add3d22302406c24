// The CUDA caching allocator's trace entries, received as they happen.
//
// c10 calls every attached tracker for each trace entry, under the allocator's
// lock, whether or not torch's own history is recording. We append each entry to
// column buffers with a little context of the allocating thread:
//   - a label id (the "phase|module|category" tag), set by the capture's hooks;
//   - the Python stack, read from the thread's interpreter frames without the GIL
//     (the thread is inside a C call, so its frames cannot change under us);
//     no Python object is touched: names are copied as text, and no reference
//     is taken or dropped;
//   - autograd's forward sequence number, and in backward the sequence number of
//     the node being run, so that a backward allocation without Python frames
//     gets the stack of the forward op that made its node.
// A drain swaps the buffers under a mutex and hands them over as numpy arrays.
//
// The allocator's lock is held while we run: nothing here calls into torch's
// allocator or takes the GIL. c10 cannot detach a tracker: stopping sets a flag.
//
// The same columns are fed on the CPU by c10's default CPU allocator (start_cpu):
// see "CPU allocator reports" below.
//
// Built without CUDA (VRAMSCOPE_NO_CUDA) for CPU captures and for tests on machines
// without a GPU: then CUDA entries arrive through record_for_test only.

#include <ATen/SequenceNumber.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/ApproximateClock.h>
#include <c10/util/Logging.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <c10/util/flat_hash_map.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/profiler/orchestration/observer.h>
#include <torch/csrc/utils/pybind.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#ifndef VRAMSCOPE_NO_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#if defined(VRAMSCOPE_FRAMES)
#if PY_VERSION_HEX < 0x030B0000 || PY_VERSION_HEX >= 0x030E0000
#error "interpreter frames are read for Python 3.11 to 3.13 only"
#endif
#define Py_BUILD_CORE 1
#include <internal/pycore_frame.h>
#undef Py_BUILD_CORE
#endif

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kSnapshotAction = 7;  // TraceEntry::SNAPSHOT: a marker of torch's own snapshots
constexpr int kAllocAction = 0, kFreeRequested = 1, kFreeCompleted = 2;
constexpr size_t kSeqRing = 1 << 16;  // forward ops remembered for their backward

struct Columns {
  std::vector<int64_t> ts_us, addr, size, stream, fwd_seq, bwd_seq;
  std::vector<int32_t> label, stack;
  std::vector<int8_t> action;
  void clear() {
    for (auto* v : {&ts_us, &addr, &size, &stream, &fwd_seq, &bwd_seq}) v->clear();
    label.clear();
    stack.clear();
    action.clear();
  }
};

struct FrameText {
  std::string filename, name;
  int line;
  bool operator==(const FrameText& o) const { return line == o.line && filename == o.filename && name == o.name; }
};

struct FrameTextHash {
  size_t operator()(const FrameText& f) const {
    return std::hash<std::string>()(f.filename) * 31 + std::hash<std::string>()(f.name) * 7 + f.line;
  }
};

struct VecHash {
  size_t operator()(const std::vector<int32_t>& v) const {
    size_t h = v.size();
    for (int32_t x : v) h = h * 1000003u ^ static_cast<size_t>(x);
    return h;
  }
};

// A code location seen before: (code object, instruction) -> frame id. The code
// object's name pointers and first line are kept to tell a freed code object's
// address, reused by another one, from the one we saw.
struct CodeSpot {
  const void* code;
  int lasti;
  bool operator==(const CodeSpot& o) const { return code == o.code && lasti == o.lasti; }
};
struct CodeSpotHash {
  size_t operator()(const CodeSpot& c) const { return std::hash<const void*>()(c.code) ^ (static_cast<size_t>(c.lasti) << 1); }
};
struct CodeSpotValue {
  const void* filename;
  const void* name;
  int firstline;
  int32_t frame;
};

// A node of the tree of call chains: the frame `frame` called from the chain `parent`
// (-1: the outermost frame read). A walk goes from its outermost frame to its innermost,
// one child lookup per frame that differs from the previous walk's, so an allocation
// costs a lookup per changed frame instead of a hash of its whole stack.
struct ChainNode {
  int32_t parent;
  int32_t frame;
  int32_t stack;  // the stack id of its innermost frames, once an allocation stood here (-1: not yet)
};

// Event times are ticks of c10's approximate clock (the TSC where there is one): the CUDA
// allocator stamps each trace entry with one already, and on the CPU one costs less than
// reading the system clock. A drain turns them into Unix microseconds (ticks_to_us).
using ClockPair = c10::ApproximateClockToUnixTimeConverter::UnixAndApproximateTimePair;

inline int64_t now_ticks() { return static_cast<int64_t>(c10::getApproximateTime()); }

struct SeqSlot {
  int64_t seq = -1;
  int32_t stack = -1;
};

struct State {
  std::mutex mu;
  Columns cols;
  ska::flat_hash_map<CodeSpot, CodeSpotValue, CodeSpotHash> spots;
  std::unordered_map<FrameText, int32_t, FrameTextHash> frame_ids;
  std::vector<FrameText> frames;
  std::unordered_map<std::vector<int32_t>, int32_t, VecHash> stack_ids;
  std::vector<std::vector<int32_t>> stacks;
  ska::flat_hash_map<uint64_t, int32_t> children;  // (parent + 1, frame) -> chain node
  std::vector<ChainNode> chains;
  size_t frames_reported = 0, stacks_reported = 0;
  ska::flat_hash_map<uint64_t, int32_t> alive_stack;  // block addr -> its alloc's stack
  std::vector<SeqSlot> seq_ring = std::vector<SeqSlot>(kSeqRing);
  std::vector<int32_t> walk;  // scratch: frame ids of the stack being read
  uint64_t generation = 0;     // bumped by start(): frame ids of earlier captures mean nothing now
  int64_t allocs = 0;
  std::string skip_prefix;     // frames of files under it are left out of stacks (empty: none)
  ClockPair clock_start{};     // (Unix ns, ticks) when the capture started
};

State& state() {
  static State* s = new State();  // never destroyed: the allocator may call us at exit
  return *s;
}

std::atomic<bool> g_on{false};
std::atomic<int> g_device{0};
std::atomic<bool> g_stacks{true};
std::atomic<int> g_max_depth{64};
std::atomic<bool> g_attached{false};
thread_local int32_t tl_label = 0;

// Where the tracker's own time goes, part by part, on the calling thread. Built in only with
// VRAMSCOPE_TIME_PARTS (bench/tracker_costs.py): each timed part adds two clock reads.
#if defined(VRAMSCOPE_TIME_PARTS)
enum Part { kPartEvent, kPartStack, kPartFree, kParts };
struct PartClock {
  int64_t ns[kParts] = {};
  int64_t calls[kParts] = {};
  int64_t frames_read = 0, frames_looked_up = 0, walks_reused = 0;
};
thread_local PartClock tl_parts;
inline int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
struct TimedPart {
  Part part;
  int64_t t0 = steady_ns();
  ~TimedPart() {
    tl_parts.ns[part] += steady_ns() - t0;
    ++tl_parts.calls[part];
  }
};
#define VRAMSCOPE_TIME(part) TimedPart timed_##part{part}
#define VRAMSCOPE_COUNT(field, n) (tl_parts.field += (n))
#else
#define VRAMSCOPE_TIME(part)
#define VRAMSCOPE_COUNT(field, n)
#endif

// Labels: id -> text and the first str object seen for it (held, and handed back by
// get_tag so that set_tag(get_tag()) finds it by pointer). Touched under the GIL only.
// Markers' labels are forgotten once read (forget_labels).
std::vector<std::string> g_labels{""};
std::vector<PyObject*> g_label_objs{nullptr};
std::unordered_map<std::string, int32_t> g_label_ids{{"", 0}};
std::unordered_map<PyObject*, int32_t> g_label_by_obj;


#if defined(VRAMSCOPE_FRAMES)
// A str's text as UTF-8 without the GIL: read from its canonical buffer, never from
// the cached UTF-8 copy (which may not exist yet and would be made under the GIL).
std::string utf8_of(PyObject* s) {
  if (s == nullptr || !PyUnicode_Check(s)) return "?";
#if PY_VERSION_HEX < 0x030C0000
  if (!PyUnicode_IS_READY(s)) return "?";  // a legacy string not made canonical yet
#endif
  Py_ssize_t n = PyUnicode_GET_LENGTH(s);
  int kind = PyUnicode_KIND(s);
  const void* data = PyUnicode_DATA(s);
  std::string out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_UCS4 c = PyUnicode_READ(kind, data, i);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else if (c < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (c >> 12)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (c >> 18)));
      out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

_PyInterpreterFrame* top_frame(PyThreadState* ts) {
#if PY_VERSION_HEX >= 0x030D0000
  return ts->current_frame;
#else
  return ts->cframe != nullptr ? ts->cframe->current_frame : nullptr;
#endif
}

PyCodeObject* code_of(_PyInterpreterFrame* f) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* exe = f->f_executable;
  return (exe != nullptr && PyCode_Check(exe)) ? reinterpret_cast<PyCodeObject*>(exe) : nullptr;
#else
  return f->f_code;
#endif
}

bool incomplete(_PyInterpreterFrame* f) {
#if PY_VERSION_HEX >= 0x030C0000
  if (f->owner == FRAME_OWNED_BY_CSTACK) return true;
#endif
  PyCodeObject* code = code_of(f);
  return code == nullptr || _PyFrame_IsIncomplete(f);
}

int32_t frame_id(State& st, PyCodeObject* code, int lasti) {
  CodeSpot key{code, lasti};
  auto it = st.spots.find(key);
  if (it != st.spots.end() && it->second.filename == code->co_filename && it->second.name == code->co_name &&
      it->second.firstline == code->co_firstlineno) {
    return it->second.frame;
  }
  FrameText text{utf8_of(code->co_filename), utf8_of(code->co_name),
                 PyCode_Addr2Line(code, lasti * static_cast<int>(sizeof(_Py_CODEUNIT)))};
  auto found = st.frame_ids.find(text);
  int32_t id;
  if (!st.skip_prefix.empty() && text.filename.compare(0, st.skip_prefix.size(), st.skip_prefix) == 0) {
    id = -1;  // the capture's own frame: left out, and remembered as such for this spot
  } else if (found != st.frame_ids.end()) {
    id = found->second;
  } else {
    id = static_cast<int32_t>(st.frames.size());
    st.frame_ids.emplace(text, id);
    st.frames.push_back(std::move(text));
  }
  st.spots[key] = CodeSpotValue{code->co_filename, code->co_name, code->co_firstlineno, id};
  return id;
}

// Where a frame stands, read from the interpreter frame alone: no code object is touched,
// whose memory is usually out of cache by the time an op allocates.
struct RawSpot {
  const void* frame;
  const void* code;   // f_code, or f_executable from 3.13
  const void* instr;  // the instruction pointer: the code's address and the offset in one
  bool operator==(const RawSpot& o) const { return frame == o.frame && code == o.code && instr == o.instr; }
};

inline RawSpot raw_spot(_PyInterpreterFrame* f) {
#if PY_VERSION_HEX >= 0x030D0000
  return RawSpot{f, f->f_executable, f->instr_ptr};
#else
  return RawSpot{f, f->f_code, f->prev_instr};
#endif
}

// A thread's walks, the previous one and the one being read, by turns. Consecutive
// allocations share their outer frames (the script, the training loop, the model's
// forward): frames equal to the previous walk's, counted from the outer end, keep its
// chain nodes without reading their code or looking them up, and a walk equal to the
// previous one keeps its stack id. A frame is the same when the frame, its code and its
// instruction pointer are: its code cannot have been freed and another put at that
// address while the frame stood at the same instruction. Plain arrays: thread-local
// storage with a destructor could be gone while the allocator still calls us as a
// thread ends.
constexpr int kRawCap = 160;  // frames read per walk at most (complete or not)
struct Walk {
  int n;
  int32_t stack;
  RawSpot spots[kRawCap];
  int32_t chains[kRawCap];  // the chain node of the frames from the outermost to this one (-1: none yet)
};
thread_local Walk tl_walks[2];
thread_local int tl_previous = 0;
thread_local uint64_t tl_generation = ~0ull;

// The chain node of `frame` called from `parent`.
int32_t chain_child(State& st, int32_t parent, int32_t frame) {
  uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(parent + 1)) << 32) | static_cast<uint32_t>(frame);
  auto it = st.children.find(key);
  if (it != st.children.end()) return it->second;
  auto id = static_cast<int32_t>(st.chains.size());
  st.chains.push_back(ChainNode{parent, frame, -1});
  st.children.emplace(key, id);
  return id;
}

// A chain's stack id: its innermost `depth` frames, innermost first. Chains that differ
// only beyond those frames share the id.
int32_t chain_stack(State& st, int32_t chain, int depth) {
  if (st.chains[chain].stack >= 0) return st.chains[chain].stack;
  auto& walk = st.walk;
  walk.clear();
  for (int32_t at = chain; at >= 0 && static_cast<int>(walk.size()) < depth; at = st.chains[at].parent) {
    walk.push_back(st.chains[at].frame);
  }
  int32_t id;
  auto it = st.stack_ids.find(walk);
  if (it != st.stack_ids.end()) {
    id = it->second;
  } else {
    id = static_cast<int32_t>(st.stacks.size());
    st.stack_ids.emplace(walk, id);
    st.stacks.push_back(walk);
  }
  st.chains[chain].stack = id;
  return id;
}

// The allocating thread's Python stack as a stack id, innermost frame first (-1: none).
int32_t python_stack(State& st) {
  VRAMSCOPE_TIME(kPartStack);
  PyThreadState* ts = PyGILState_GetThisThreadState();
  if (ts == nullptr) return -1;
  int depth = g_max_depth.load(std::memory_order_relaxed);
  int limit = std::min(depth + 16, kRawCap);  // room for a few incomplete frames
  Walk& last = tl_walks[tl_previous];
  Walk& now = tl_walks[1 - tl_previous];
  int n = 0;
#if defined(__GNUC__)
  // The frames are read one after another through `previous`, each read waiting for the
  // last, and the model's work since the previous walk has pushed them out of the nearest
  // caches. This walk's frames are mostly that walk's: ask for all their cache lines at
  // once (a prefetch of a stale address does nothing).
  for (int i = 0; i < last.n; ++i) {
    const char* p = static_cast<const char*>(last.spots[i].frame);
    __builtin_prefetch(p);
    __builtin_prefetch(p + 64);  // a frame's fields read here span its first 72 bytes
  }
#endif
  for (_PyInterpreterFrame* f = top_frame(ts); f != nullptr && n < limit; f = f->previous) {
#if PY_VERSION_HEX >= 0x030C0000
    if (f->owner == FRAME_OWNED_BY_CSTACK) continue;
#endif
    now.spots[n++] = raw_spot(f);
  }
  if (n == 0) return -1;
  if (tl_generation != st.generation) {  // a new capture: frame ids start again
    last.n = 0;
    tl_generation = st.generation;
  }
  int m = last.n, same = 0;
  while (same < n && same < m && now.spots[n - 1 - same] == last.spots[m - 1 - same]) {
    now.chains[n - 1 - same] = last.chains[m - 1 - same];
    ++same;
  }
  VRAMSCOPE_COUNT(frames_read, n);
  VRAMSCOPE_COUNT(frames_looked_up, n - same);
  if (same == n && n == m) {
    VRAMSCOPE_COUNT(walks_reused, 1);
    return last.stack;
  }
  for (int i = n - 1 - same; i >= 0; --i) {
    auto* f = static_cast<_PyInterpreterFrame*>(const_cast<void*>(now.spots[i].frame));
    // An incomplete frame, or one of the capture's own files (frame id -1), adds nothing.
    int32_t frame = incomplete(f) ? -1 : frame_id(st, code_of(f), _PyInterpreterFrame_LASTI(f));
    int32_t parent = i + 1 < n ? now.chains[i + 1] : -1;
    now.chains[i] = frame < 0 ? parent : chain_child(st, parent, frame);
  }
  int32_t id = now.chains[0] < 0 ? -1 : chain_stack(st, now.chains[0], depth);
  now.n = n;
  now.stack = id;
  tl_previous = 1 - tl_previous;
  return id;
}
constexpr bool kFrames = true;
#else
int32_t python_stack(State&) { return -1; }
constexpr bool kFrames = false;
#endif

int64_t current_node_seq() {
  auto node = torch::autograd::get_current_node();
  if (!node) return -1;
  uint64_t seq = node->sequence_nr();
  return seq > static_cast<uint64_t>(INT64_MAX) ? -1 : static_cast<int64_t>(seq);
}

// The stack of an event: a fresh walk for allocations, the allocation's for frees.
int32_t stack_for(State& st, int action, uint64_t addr, int64_t fwd_seq, int64_t bwd_seq) {
  if (action == kFreeRequested || action == kFreeCompleted) {
    VRAMSCOPE_TIME(kPartFree);
    auto it = st.alive_stack.find(addr);
    if (it == st.alive_stack.end()) return -1;
    int32_t s = it->second;
    if (action == kFreeCompleted) st.alive_stack.erase(it);
    return s;
  }
  int32_t s = g_stacks.load(std::memory_order_relaxed) ? python_stack(st) : -1;
  if (action != kAllocAction) return s;
  if (s >= 0 && bwd_seq < 0 && fwd_seq > 0) {
    // The first allocation after a node was made belongs to the op that made it.
    SeqSlot& slot = st.seq_ring[static_cast<size_t>(fwd_seq - 1) & (kSeqRing - 1)];
    if (slot.seq != fwd_seq - 1) slot = SeqSlot{fwd_seq - 1, s};
  } else if (s < 0 && bwd_seq >= 0) {
    const SeqSlot& slot = st.seq_ring[static_cast<size_t>(bwd_seq) & (kSeqRing - 1)];
    if (slot.seq == bwd_seq) s = slot.stack;
  }
  st.alive_stack[addr] = s;
  return s;
}

void record(int action, int device, uint64_t addr, uint64_t size, int64_t stream, int64_t ticks) {
  if (!g_on.load(std::memory_order_acquire) || device != g_device.load(std::memory_order_relaxed) ||
      action == kSnapshotAction) {
    return;
  }
  VRAMSCOPE_TIME(kPartEvent);
  int64_t fwd_seq = static_cast<int64_t>(at::sequence_number::peek());
  int64_t bwd_seq = current_node_seq();
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  int32_t stack = stack_for(st, action, addr, fwd_seq, bwd_seq);
  Columns& c = st.cols;
  c.ts_us.push_back(ticks);
  c.action.push_back(static_cast<int8_t>(action));
  c.addr.push_back(static_cast<int64_t>(addr));
  c.size.push_back(static_cast<int64_t>(size));
  c.stream.push_back(stream);
  c.label.push_back(tl_label);
  c.stack.push_back(stack);
  c.fwd_seq.push_back(fwd_seq);
  c.bwd_seq.push_back(bwd_seq);
  if (action == kAllocAction) ++st.allocs;
}

#ifndef VRAMSCOPE_NO_CUDA
template <typename S>
int64_t stream_id(const S& s) {
  if constexpr (std::is_pointer_v<S>) {
    return static_cast<int64_t>(reinterpret_cast<intptr_t>(s));
  } else {
    return static_cast<int64_t>(s.id());
  }
}

// The entry's own time, where torch's TraceEntry carries it as approximate-clock ticks.
template <typename E>
auto entry_ticks(const E& e, int) -> decltype(static_cast<int64_t>(e.time_.approx_t_)) {
  return static_cast<int64_t>(e.time_.approx_t_);
}
template <typename E>
int64_t entry_ticks(const E&, long) {
  return now_ticks();
}

// The allocator's counters that a step row keeps, read without building torch's dict of
// every statistic (torch._C._cuda_memoryStats: about 24 us a call): allocated, reserved,
// active and inactive-split bytes now, allocated and reserved peaks, alloc retries, OOMs,
// and allocations made, all for the aggregate pool.
py::tuple device_counters(int device) {
  auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  constexpr size_t all = 0;  // StatType::AGGREGATE
  return py::make_tuple(s.allocated_bytes[all].current, s.reserved_bytes[all].current, s.active_bytes[all].current,
                        s.inactive_split_bytes[all].current, s.allocated_bytes[all].peak, s.reserved_bytes[all].peak,
                        s.num_alloc_retries, s.num_ooms, s.allocation[all].allocated);
}

void on_entry(const c10::cuda::CUDACachingAllocator::TraceEntry& e) {
  try {
    record(static_cast<int>(e.action_), static_cast<int>(e.device_), static_cast<uint64_t>(e.addr_),
           static_cast<uint64_t>(e.size_), stream_id(e.stream_), entry_ticks(e, 0));
  } catch (...) {
    // Out of host memory for our buffers: the entry is lost, and the allocator's own
    // counters, compared at each drain, count it as dropped.
  }
}
#endif

// -- CPU allocator reports --------------------------------------------------------------
//
// c10's default CPU allocator reports each allocation (size > 0) and free (size < 0)
// to the MemoryReportingInfoBase in the thread's debug info slot PROFILER_STATE, when
// that one says memory profiling is on. start_cpu pushes ours on the capturing thread;
// ThreadLocalState carries it into the threads that run work for it (autograd's
// workers, at::launch); OpenMP's intra-op workers do not inherit it, so what they
// allocate inside a parallel region is not seen (nor freed: c10 reports the free of a
// block only if it reported its allocation). A thread without Python frames of its own
// takes the capturing thread's tag and the stack of its latest allocation.
//
// Each report is appended under the state's mutex, which also orders the byte counter:
// CpuState's `allocated` and `peak` are exactly the replay of the appended events. A
// free is a free_requested then a free_completed, same time, address and size.
// Frees of blocks this capture did not see allocated (made before it) are dropped.
//
// Backward: CPU autograd runs on the calling thread, whose Python frames are those of
// the backward() call; an allocation made while a node runs (grad mode off: not a
// recomputation) takes the stack of the forward op that made the node, as on CUDA, and
// one made by a node that has none the stack the backward allocation before it took;
// a node that runs Python (a custom Function, compiled code) keeps its own frames.

struct CpuState {
  ska::flat_hash_map<uint64_t, int64_t> alive;  // block addr -> size
  int64_t allocated = 0, peak = 0;
  int32_t last_stack = -1;  // the latest allocation's stack from a thread with Python frames
  int32_t last_backward = -1;  // the latest stack a backward allocation took from its node
};

CpuState& cpu_state() {
  static CpuState* s = new CpuState();  // guarded by state().mu; never destroyed
  return *s;
}

std::atomic<bool> g_cpu_on{false};
std::atomic<int32_t> g_main_label{0};  // the capturing thread's tag
thread_local bool tl_capturing = false;
thread_local bool tl_adopting = false;  // adopt() registers a block: its report is ours

void append_locked(State& st, int action, uint64_t addr, int64_t size, int32_t label, int32_t stack,
                   int64_t fwd_seq, int64_t bwd_seq, int64_t ts) {
  Columns& c = st.cols;
  c.ts_us.push_back(ts);
  c.action.push_back(static_cast<int8_t>(action));
  c.addr.push_back(static_cast<int64_t>(addr));
  c.size.push_back(size);
  c.stream.push_back(0);
  c.label.push_back(label);
  c.stack.push_back(stack);
  c.fwd_seq.push_back(fwd_seq);
  c.bwd_seq.push_back(bwd_seq);
  if (action == kAllocAction) ++st.allocs;
}

void cpu_free_locked(State& st, CpuState& cs, uint64_t addr, int32_t label, int64_t ts) {
  auto it = cs.alive.find(addr);
  if (it == cs.alive.end()) return;  // allocated before this capture
  int64_t size = it->second;
  cs.alive.erase(it);
  cs.allocated -= size;
  // No stack, as on the python path: a step's site sequence (hook sampling) is then its
  // own allocations', not those of the steps whose blocks it frees.
  append_locked(st, kFreeRequested, addr, size, label, -1, -1, -1, ts);
  append_locked(st, kFreeCompleted, addr, size, label, -1, -1, -1, ts);
}

// The node being run: its sequence number, or kNoNode, kNodeNoSeq (a C++ node without
// one: a parameter's AccumulateGrad) or kPythonNode (a custom Function's or compiled
// code's backward, whose own Python frames say more than its forward's stack).
constexpr int64_t kNoNode = -1, kNodeNoSeq = -2, kPythonNode = -3;

// torch::autograd::PyNode, told by its type's name: libtorch_python does not export
// its type info, so no dynamic_cast can name it. The match is remembered by address.
std::atomic<const std::type_info*> g_py_node_type{nullptr};
bool is_python_node(const torch::autograd::Node& node) {
  const std::type_info& type = typeid(node);
  if (&type == g_py_node_type.load(std::memory_order_relaxed)) return true;
  const char* name = type.name();
  if (std::strcmp(name + (*name == '*'), "N5torch8autograd6PyNodeE") != 0) return false;
  g_py_node_type.store(&type, std::memory_order_relaxed);
  return true;
}
int64_t node_seq() {
  auto node = torch::autograd::get_current_node();
  if (!node) return kNoNode;
  if (is_python_node(*node)) return kPythonNode;
  uint64_t seq = node->sequence_nr();
  return seq > static_cast<uint64_t>(INT64_MAX) ? kNodeNoSeq : static_cast<int64_t>(seq);
}

// The stack of a CPU allocation; the caller holds st.mu.
int32_t cpu_stack(State& st, CpuState& cs, int64_t fwd_seq, int64_t bwd_seq, bool python) {
  if (!g_stacks.load(std::memory_order_relaxed)) return -1;
  if ((bwd_seq >= 0 || bwd_seq == kNodeNoSeq) && !at::GradMode::is_enabled()) {
    const SeqSlot& slot = st.seq_ring[static_cast<size_t>(bwd_seq) & (kSeqRing - 1)];
    if (bwd_seq >= 0 && slot.seq == bwd_seq && slot.stack >= 0) return cs.last_backward = slot.stack;
    // A node no forward op allocated after (a view's) or none made (a parameter's
    // AccumulateGrad, which sums a tied weight's gradients): its work is on the
    // gradient the node before it made, whose stack is the latest taken.
    if (cs.last_backward >= 0) return cs.last_backward;
  }
  if (!python) return cs.last_stack;
  int32_t s = python_stack(st);
  if (s < 0) return s;
  cs.last_stack = s;
  if (bwd_seq == kNoNode && fwd_seq > 0) {
    // The first allocation after a node was made belongs to the op that made it.
    SeqSlot& slot = st.seq_ring[static_cast<size_t>(fwd_seq - 1) & (kSeqRing - 1)];
    if (slot.seq != fwd_seq - 1) slot = SeqSlot{fwd_seq - 1, s};
  }
  return s;
}

void record_cpu(void* ptr, int64_t delta) {
  if (!g_cpu_on.load(std::memory_order_acquire) || tl_adopting || delta == 0) return;
  VRAMSCOPE_TIME(kPartEvent);
  uint64_t addr = reinterpret_cast<uintptr_t>(ptr);
  bool python = PyGILState_GetThisThreadState() != nullptr;
  int32_t label = python ? tl_label : g_main_label.load(std::memory_order_relaxed);
  State& st = state();
  CpuState& cs = cpu_state();
  if (delta < 0) {
    std::lock_guard<std::mutex> lock(st.mu);
    cpu_free_locked(st, cs, addr, label, now_ticks());
    return;
  }
  int64_t fwd_seq = static_cast<int64_t>(at::sequence_number::peek());
  int64_t bwd_seq = node_seq();
  std::lock_guard<std::mutex> lock(st.mu);
  int64_t ts = now_ticks();
  // Still alive here: its free was made where c10 did not report it (a thread without
  // our debug info). The address is free again now, so the block was freed before.
  cpu_free_locked(st, cs, addr, label, ts);
  int32_t stack = cpu_stack(st, cs, fwd_seq, bwd_seq, python);
  cs.alive[addr] = delta;
  cs.allocated += delta;
  cs.peak = std::max(cs.peak, cs.allocated);
  append_locked(st, kAllocAction, addr, delta, label, stack, fwd_seq, bwd_seq, ts);
}

// Frees on any thread. c10 reports a free only on a thread that holds our debug info,
// but a block may be freed elsewhere: by gloo's threads when a collective's work ends,
// by a DataLoader's pin thread, by a garbage collection another thread runs. While a
// capture runs, the CPU allocator is wrapped: a block of c10's default allocator gets a
// deleter of ours that records its free (on whatever thread) and then frees it as c10
// would. The block keeps that deleter after the capture (it then only frees), so the
// wrapper is never destroyed; it is put back to the allocator it wrapped at stop.
void free_on_any_thread(void* ptr);

struct FreeWatch final : c10::Allocator {
  c10::Allocator* inner = nullptr;           // c10's default CPU allocator
  c10::DeleterFnPtr inner_deleter = nullptr;  // its deleter
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner->allocate(n);
    if (!g_cpu_on.load(std::memory_order_relaxed) || p.get_deleter() != inner_deleter || p.get() != p.get_context()) {
      return p;
    }
    void* data = p.release_context();
    return c10::DataPtr(data, data, &free_on_any_thread, p.device());
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_on_any_thread; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { inner->copy_data(dest, src, count); }
};

FreeWatch& free_watch() {
  static FreeWatch* w = new FreeWatch();  // never destroyed: blocks keep its deleter
  return *w;
}

void free_on_any_thread(void* ptr) {
  if (g_cpu_on.load(std::memory_order_acquire)) {
    try {
      bool python = PyGILState_GetThisThreadState() != nullptr;
      int32_t label = python ? tl_label : g_main_label.load(std::memory_order_relaxed);
      State& st = state();
      std::lock_guard<std::mutex> lock(st.mu);
      cpu_free_locked(st, cpu_state(), reinterpret_cast<uintptr_t>(ptr), label, now_ticks());
    } catch (...) {
    }
  }
  free_watch().inner_deleter(ptr);  // c10's own: it reports the free where it can (we find no block)
}

// Wraps the CPU allocator where it is c10's default one (another's blocks are not ours to
// free); false where it is not, and frees are then seen on capturing threads only.
bool watch_frees(bool on) {
  FreeWatch& w = free_watch();
  c10::Allocator* current = c10::GetCPUAllocator();
  if (on) {
    if (current == &w) return true;
    if (current != c10::GetDefaultCPUAllocator()) return false;
    w.inner = current;
    w.inner_deleter = current->raw_deleter();
    c10::SetCPUAllocator(&w, 0);
    return c10::GetCPUAllocator() == &w;
  }
  if (current == &w) c10::SetCPUAllocator(w.inner, 0);
  return false;
}

// torch reads whatever is in the PROFILER_STATE slot as its own profiler's state
// (ProfilerStateBase: profilerEnabled(), getProfilerConfig()), so ours is one: a
// profiler state whose config says disabled, that only takes memory reports.
struct CpuReporter : torch::profiler::impl::ProfilerStateBase {
  CpuReporter()
      : torch::profiler::impl::ProfilerStateBase(
            torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::Disabled)) {}
  torch::profiler::impl::ActiveProfilerType profilerType() override {
    return torch::profiler::impl::ActiveProfilerType::NONE;
  }
  void reportMemoryUsage(void* ptr, int64_t alloc_size, size_t, size_t, c10::Device device) override {
    if (device.type() != c10::DeviceType::CPU) return;
    try {
      record_cpu(ptr, alloc_size);
    } catch (...) {
      // Out of host memory for our buffers: the event is lost.
    }
  }
  bool memoryProfilingEnabled() const override { return g_cpu_on.load(std::memory_order_relaxed); }
};

std::shared_ptr<c10::DebugInfoBase> g_reporter;  // ours while pushed on the capturing thread

// c10 logs a warning at the first free (then one in a thousand) of a block it did not
// see allocated, such as every tensor made before the capture: expected here, so c10's
// log shows errors only while a CPU capture runs (torch's Python warnings are not these).
constexpr int kLogErrorsOnly = 2;  // c10's GLOG_ERROR
int g_saved_log_level = 0;
bool g_log_quieted = false;

void quiet_c10_log(bool quiet) {
  if (quiet && !g_log_quieted) {
    g_saved_log_level = FLAGS_caffe2_log_level;
    FLAGS_caffe2_log_level = std::max(g_saved_log_level, kLogErrorsOnly);
    g_log_quieted = true;
  } else if (!quiet && g_log_quieted) {
    if (FLAGS_caffe2_log_level == std::max(g_saved_log_level, kLogErrorsOnly)) FLAGS_caffe2_log_level = g_saved_log_level;
    g_log_quieted = false;
  }
}

// -- Python API ------------------------------------------------------------------------

bool attach() {
#ifdef VRAMSCOPE_NO_CUDA
  return false;
#else
  bool expected = false;
  if (g_attached.compare_exchange_strong(expected, true)) {
    c10::cuda::CUDACachingAllocator::attachAllocatorTraceTracker(&on_entry);
  }
  return true;
#endif
}

// -- drained columns ---------------------------------------------------------------------
//
// A drain hands the columns over to numpy without a copy: the arrays are views of a
// Columns that a capsule owns, and when the last of them is gone the Columns goes back
// to a small pool, emptied but with its capacity, to be swapped in by a later drain.
// Appends then fill memory that is already mapped. Fresh memory costs a page fault per
// 4 KiB (microseconds in a VM), and would be taken under the allocator's lock; a copy
// into new arrays would fault as often, since the C library hands large blocks back to
// the system when they are freed. The pool is touched under the GIL only (drain, the
// capsules' destructors, start).

constexpr size_t kPooled = 3;             // Columns kept for reuse at most
constexpr size_t kKeptEvents = 1 << 16;  // capacity kept: up to 4x max(this, the last drain)

std::vector<Columns*>& column_pool() {
  static auto* pool = new std::vector<Columns*>();  // never destroyed: arrays may outlive us
  return *pool;
}
size_t g_last_drain_events = 0;

bool capturing() { return g_on.load(std::memory_order_relaxed) || g_cpu_on.load(std::memory_order_relaxed); }

void give_back(void* p) {
  auto* cols = static_cast<Columns*>(p);
  auto& pool = column_pool();
  if (capturing() && pool.size() < kPooled && cols->ts_us.capacity() <= 4 * std::max(g_last_drain_events, kKeptEvents)) {
    cols->clear();
    pool.push_back(cols);
  } else {
    delete cols;
  }
}

Columns* pooled_columns() {
  auto& pool = column_pool();
  if (pool.empty()) return new Columns();
  Columns* cols = pool.back();
  pool.pop_back();
  return cols;
}

void release_pool() {  // a capture's end: nothing is kept for the next one
  for (Columns* c : column_pool()) delete c;
  column_pool().clear();
}

template <typename T>
py::array_t<T> view_of(std::vector<T>& v, const py::capsule& owner) {
  if (v.empty()) return py::array_t<T>(0);
  return py::array_t<T>({static_cast<py::ssize_t>(v.size())}, {static_cast<py::ssize_t>(sizeof(T))}, v.data(), owner);
}

// Everything a capture starts afresh; the caller holds st.mu.
void reset_locked(State& st, const std::string& skip_prefix) {
  st.cols = Columns();  // a new capture starts small (the pool keeps what drains hand back)
  st.spots.clear();
  st.frame_ids.clear();
  st.frames.clear();
  st.stack_ids.clear();
  st.stacks.clear();
  st.children.clear();
  st.chains.clear();
  st.frames_reported = st.stacks_reported = 0;
  st.alive_stack.clear();
  std::fill(st.seq_ring.begin(), st.seq_ring.end(), SeqSlot{});
  st.allocs = 0;
  st.skip_prefix = skip_prefix;
  st.clock_start = c10::ApproximateClockToUnixTimeConverter::measurePair();
  ++st.generation;
}

void start(int device, bool stacks, int max_depth, const std::string& skip_prefix) {
  State& st = state();
  {
    std::lock_guard<std::mutex> lock(st.mu);
    reset_locked(st, skip_prefix);
  }
  g_device.store(device);
  g_stacks.store(stacks);
  g_max_depth.store(max_depth);
  g_on.store(true, std::memory_order_release);
}

void stop() {
  g_on.store(false, std::memory_order_release);
  release_pool();
}

void set_stacks(bool on) { g_stacks.store(on); }

void set_tag(py::handle tag) {
  PyObject* obj = tag.ptr();
  auto hit = g_label_by_obj.find(obj);
  if (hit != g_label_by_obj.end()) {
    tl_label = hit->second;
    if (tl_capturing) g_main_label.store(tl_label, std::memory_order_relaxed);
    return;
  }
  std::string text = py::cast<std::string>(tag);
  auto known = g_label_ids.find(text);
  int32_t id;
  if (known != g_label_ids.end()) {
    id = known->second;
  } else {
    id = static_cast<int32_t>(g_labels.size());
    g_label_ids.emplace(text, id);
    g_labels.push_back(text);
    g_label_objs.push_back(nullptr);
  }
  if (g_label_objs[id] == nullptr) {
    Py_INCREF(obj);
    g_label_objs[id] = obj;
  }
  if (g_label_by_obj.size() < 65536) {  // str objects other than the first are not held: bounded
    if (g_label_objs[id] == obj) g_label_by_obj.emplace(obj, id);
  }
  tl_label = id;
  if (tl_capturing) g_main_label.store(id, std::memory_order_relaxed);
}

py::object get_tag() {
  PyObject* obj = g_label_objs[tl_label];
  if (obj != nullptr) return py::reinterpret_borrow<py::object>(obj);
  return py::str(g_labels[tl_label]);
}

// Labels used once, the capture's position markers (one a step, for as long as it runs), are
// forgotten once Python has read them: their text and str object go, and only their id's slot
// stays, since drained columns hold the id. A decode loop makes a step a token: kept, their
// labels grew the process by about 30 MB per 100,000 steps. A label still set on this thread
// (the caller's) is kept. Returns the ids forgotten.
std::vector<int32_t> forget_labels(const std::vector<int32_t>& ids) {
  std::vector<int32_t> forgotten;
  for (int32_t id : ids) {
    if (id <= 0 || id >= static_cast<int32_t>(g_labels.size()) || id == tl_label) continue;
    auto named = g_label_ids.find(g_labels[id]);
    if (named != g_label_ids.end() && named->second == id) g_label_ids.erase(named);
    if (PyObject* obj = g_label_objs[id]) {
      auto held = g_label_by_obj.find(obj);  // before the str can go: its address may be reused
      if (held != g_label_by_obj.end() && held->second == id) g_label_by_obj.erase(held);
      g_label_objs[id] = nullptr;
      Py_DECREF(obj);
    }
    std::string().swap(g_labels[id]);
    forgotten.push_back(id);
  }
  return forgotten;
}

py::list labels_from(size_t first) {
  py::list out;
  for (size_t i = first; i < g_labels.size(); ++i) out.append(py::str(g_labels[i]));
  return out;
}

// Ticks to Unix microseconds: at the tick rate measured from the capture's start to now
// (the longer the span, the truer), counted from now's pair.
void ticks_to_us(std::vector<int64_t>& ts, const ClockPair& start, const ClockPair& now) {
  auto span = static_cast<double>(static_cast<int64_t>(static_cast<uint64_t>(now.approx_t_) -
                                                       static_cast<uint64_t>(start.approx_t_)));
  double ns_per_tick = span > 0 ? static_cast<double>(now.t_ - start.t_) / span : 1.0;
  for (auto& t : ts) {
    auto since = static_cast<int64_t>(static_cast<uint64_t>(t) - static_cast<uint64_t>(now.approx_t_));
    t = (now.t_ + static_cast<int64_t>(static_cast<double>(since) * ns_per_tick)) / 1000;
  }
}

py::dict drain() {
  State& st = state();
  Columns* taken = pooled_columns();
  std::vector<FrameText> new_frames;
  std::vector<std::vector<int32_t>> new_stacks;
  int64_t allocs;
  ClockPair start, now;
  {
    std::lock_guard<std::mutex> lock(st.mu);
    std::swap(*taken, st.cols);
    start = st.clock_start;
    now = c10::ApproximateClockToUnixTimeConverter::measurePair();  // after every event taken
    new_frames.assign(st.frames.begin() + static_cast<std::ptrdiff_t>(st.frames_reported), st.frames.end());
    new_stacks.assign(st.stacks.begin() + static_cast<std::ptrdiff_t>(st.stacks_reported), st.stacks.end());
    st.frames_reported = st.frames.size();
    st.stacks_reported = st.stacks.size();
    allocs = st.allocs;
  }
  ticks_to_us(taken->ts_us, start, now);
  g_last_drain_events = taken->ts_us.size();
  py::capsule owner(taken, give_back);
  Columns& cols = *taken;
  py::dict out;
  out["ts_us"] = view_of(cols.ts_us, owner);
  out["action"] = view_of(cols.action, owner);
  out["addr"] = view_of(cols.addr, owner);
  out["size"] = view_of(cols.size, owner);
  out["stream"] = view_of(cols.stream, owner);
  out["label"] = view_of(cols.label, owner);
  out["stack"] = view_of(cols.stack, owner);
  out["fwd_seq"] = view_of(cols.fwd_seq, owner);
  out["bwd_seq"] = view_of(cols.bwd_seq, owner);
  py::list frames;
  for (auto& f : new_frames) frames.append(py::make_tuple(f.filename, f.line, f.name));
  out["new_frames"] = frames;
  out["new_stacks"] = new_stacks;
  out["allocs"] = allocs;
  return out;
}


// -- what a drain's columns become -------------------------------------------------------
//
// One pass over a drain's label, stack and action columns for what Python makes of them
// (NativeColumns._columns in native_cuda.py, and the hook sampling's site sequences in
// sampling.py). A drain is paid on the profiled thread at a step's end, after the model's
// work has pushed the capture's code and data out of the CPU's caches: there each of the
// few dozen numpy calls this replaces costs tens of microseconds whatever its size.
//
// In: the tracker's stack ids and label ids of each event, its action; `stack_of` (tracker
// stack id -> interner stack id), `marker_step` (label id -> the step a marker's tag names,
// -1 for no marker, -2 for a marker naming none) and `n_labels` (labels Python knows).
// `markers`: whether markers split the stream into steps (CUDA), or the drain is one step.
// Out:
//   stack_id   interner stack id per event (-1: none);
//   action     the action as int32 (Arrow's dictionary indices: one of `n_actions`, checked);
//   tag_code   per event, the rank of its label among the labels in use (`tag_used`, ascending);
//   site_keys  per block event (alloc, free_requested, free_completed; markers aside), its
//              site (stack id + 1) * 3 + action, in order;
//   site_starts, site_steps  where each run of block events of one step begins in site_keys,
//              and that step (-1: the step the drain before ended in, before this drain's first
//              marker);
//   last_step  the step of the drain's last marker that names one (-1: none).
template <typename T>
using InArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> filled_array(std::vector<T>&& v) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owned->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        owned->data(), owner);
}

py::dict drain_codes(const InArray<int32_t>& label, const InArray<int32_t>& stack, const InArray<int8_t>& action,
                     const InArray<int32_t>& stack_of, const InArray<int64_t>& marker_step, int64_t n_labels,
                     bool markers, int n_actions) {
  const py::ssize_t n = label.size();
  if (stack.size() != n || action.size() != n) throw py::value_error("drain columns of different lengths");
  if (n_labels < 0 || n_labels > marker_step.size()) throw py::value_error("more labels than marker steps");
  const int32_t* lab = label.data();
  const int32_t* stk = stack.data();
  const int8_t* act = action.data();
  const int32_t* interned = stack_of.data();
  const py::ssize_t known_stacks = stack_of.size();
  const int64_t* marked = marker_step.data();
  std::vector<int32_t> stack_id(static_cast<size_t>(n)), action32(static_cast<size_t>(n)), tag_code(static_cast<size_t>(n));
  std::vector<int32_t> keys, used;
  std::vector<int64_t> starts, steps;
  // Label id -> its rank among the labels in use, -1 outside a call: kept between calls (under
  // the GIL) and reset label by label. Made afresh, it was a pass over every label ever made
  // (markers make one a step), so each drain of a long decode loop grew with the steps behind it.
  static std::vector<int32_t> rank;
  if (rank.size() < static_cast<size_t>(n_labels)) rank.resize(static_cast<size_t>(n_labels), -1);
  struct Reset {
    std::vector<int32_t>& rank;
    std::vector<int32_t>& used;
    ~Reset() {
      for (int32_t l : used) rank[static_cast<size_t>(l)] = -1;
    }
  } reset{rank, used};
  keys.reserve(static_cast<size_t>(n));
  int64_t step = -1, last_step = -1;
  for (py::ssize_t i = 0; i < n; ++i) {
    int32_t l = lab[i];
    if (l < 0 || l >= n_labels) throw py::value_error("a drained label that Python does not know");
    if (rank[static_cast<size_t>(l)] < 0) {
      rank[static_cast<size_t>(l)] = 0;
      used.push_back(l);
    }
    int32_t s = stk[i];
    int32_t sid = (s >= 0 && s < known_stacks) ? interned[s] : -1;
    stack_id[static_cast<size_t>(i)] = sid;
    int32_t a = act[i];
    if (a < 0 || a >= n_actions) throw py::value_error("an action the drain has no name for");
    action32[static_cast<size_t>(i)] = a;
    bool block = a == kAllocAction || a == kFreeRequested || a == kFreeCompleted;
    if (markers) {
      int64_t m = marked[l];
      if (m >= 0) step = last_step = m;
      if (m != -1) block = false;  // a marker's own alloc and free are no site
    }
    if (!block) continue;
    if (starts.empty() || steps.back() != step) {
      starts.push_back(static_cast<int64_t>(keys.size()));
      steps.push_back(step);
    }
    keys.push_back((sid + 1) * 3 + a);
  }
  std::sort(used.begin(), used.end());
  for (size_t r = 0; r < used.size(); ++r) rank[static_cast<size_t>(used[r])] = static_cast<int32_t>(r);
  for (py::ssize_t i = 0; i < n; ++i) tag_code[static_cast<size_t>(i)] = rank[static_cast<size_t>(lab[i])];
  std::vector<int32_t> used_out(used);  // `used` itself resets `rank` on the way out
  py::dict out;
  out["stack_id"] = filled_array(std::move(stack_id));
  out["action"] = filled_array(std::move(action32));
  out["tag_code"] = filled_array(std::move(tag_code));
  out["tag_used"] = filled_array(std::move(used_out));
  out["site_keys"] = filled_array(std::move(keys));
  out["site_starts"] = filled_array(std::move(starts));
  out["site_steps"] = filled_array(std::move(steps));
  out["last_step"] = last_step;
  return out;
}

// -- CPU API ---------------------------------------------------------------------------

void start_cpu(bool stacks, int max_depth, const std::string& skip_prefix) {
  State& st = state();
  {
    std::lock_guard<std::mutex> lock(st.mu);
    reset_locked(st, skip_prefix);
    CpuState& cs = cpu_state();
    cs.alive.clear();
    cs.allocated = cs.peak = 0;
    cs.last_stack = cs.last_backward = -1;
  }
  g_stacks.store(stacks);
  g_max_depth.store(max_depth);
  g_main_label.store(tl_label);
  if (!tl_capturing) {
    if (c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) != nullptr) {
      // torch's profiler holds the slot: ours on top would hide its state from its callbacks.
      throw std::runtime_error("torch's profiler is running on this thread");
    }
    g_reporter = std::make_shared<CpuReporter>();
    c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, g_reporter);
    tl_capturing = true;
  }
  quiet_c10_log(true);
  watch_frees(true);
  g_cpu_on.store(true, std::memory_order_release);
}

// Recording stops at once; our debug info is taken off the capturing thread where it is
// still the latest pushed (elsewhere it stays, saying profiling is off).
void stop_cpu() {
  g_cpu_on.store(false, std::memory_order_release);
  release_pool();
  quiet_c10_log(false);
  watch_frees(false);
  if (!tl_capturing) return;
  tl_capturing = false;
  try {
    if (c10::ThreadLocalDebugInfo::_peek(c10::DebugInfoKind::PROFILER_STATE) == g_reporter) {
      c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
    }
  } catch (...) {
  }
}

// A block that pre-dates the capture (a parameter, a buffer) recorded as allocated now,
// and registered with c10's reporter so that its free is reported. Only blocks of the
// default CPU allocator: another's deleter never reports. False: not recorded.
bool adopt(const at::Tensor& t) {
  if (!g_cpu_on.load(std::memory_order_acquire) || !t.defined() || !t.is_cpu() || !t.has_storage()) return false;
  const c10::Storage& storage = t.storage();
  void* ptr = storage.mutable_data();
  int64_t size = static_cast<int64_t>(storage.nbytes());
  if (ptr == nullptr || size <= 0 ||
      (storage.data_ptr().get_deleter() != c10::GetDefaultCPUAllocator()->raw_deleter() &&
       storage.data_ptr().get_deleter() != &free_on_any_thread)) {
    return false;
  }
  uint64_t addr = reinterpret_cast<uintptr_t>(ptr);
  State& st = state();
  CpuState& cs = cpu_state();
  {
    std::lock_guard<std::mutex> lock(st.mu);
    if (cs.alive.count(addr)) return false;
    int32_t stack = g_stacks.load(std::memory_order_relaxed) ? python_stack(st) : -1;
    cs.alive[addr] = size;
    cs.allocated += size;
    cs.peak = std::max(cs.peak, cs.allocated);
    append_locked(st, kAllocAction, addr, size, 0, stack, -1, -1, now_ticks());
  }
  tl_adopting = true;  // c10 reports it to us: already recorded
  c10::profiledCPUMemoryReporter().New(ptr, static_cast<size_t>(size));
  tl_adopting = false;
  return true;
}

py::tuple cpu_counters() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  CpuState& cs = cpu_state();
  return py::make_tuple(cs.allocated, cs.peak);
}

void cpu_off_in_child() { g_cpu_on.store(false, std::memory_order_relaxed); }

void record_for_test(int action, int device, uint64_t addr, uint64_t size, int64_t stream) {
  py::gil_scoped_release release;  // as the allocator calls us: inside an op, GIL released
  record(action, device, addr, size, stream, now_ticks());
}

#if defined(VRAMSCOPE_TIME_PARTS)
// The calling thread's part clocks since the last call (then zeroed), and what one clock read costs.
py::dict part_times() {
  PartClock p = tl_parts;
  tl_parts = PartClock();
  int64_t t0 = steady_ns(), sink = 0;
  constexpr int kReads = 100000;
  for (int i = 0; i < kReads; ++i) sink ^= steady_ns();
  py::dict d;
  d["clock_read_ns"] = static_cast<double>(steady_ns() - t0) / kReads + static_cast<double>(sink & 0);
  const char* names[kParts] = {"event", "stack", "free"};
  for (int i = 0; i < kParts; ++i) {
    d[py::str(std::string(names[i]) + "_ns")] = p.ns[i];
    d[py::str(std::string(names[i]) + "_calls")] = p.calls[i];
  }
  d["frames_read"] = p.frames_read;
  d["frames_looked_up"] = p.frames_looked_up;
  d["walks_reused"] = p.walks_reused;
  return d;
}
#endif

// A KV cache's facts in one call (profiler/capture/kv.py's kv_row, once per decode token):
// each layer as (keys, values, filled), filled -1 for all its positions. A layer counts when
// both are tensors of 2 or more dimensions with elements, as kv.py's _states says. Returns
// (layers counted, batch, tokens, token-state bytes, reserved bytes), reserved counting each
// storage once, or None where a tensor has no memory of its own (a wrapper subclass, a meta
// tensor): the caller then measures in Python. The same figures as the Python loop, without its half a
// dozen Python calls a tensor (tests/unit/test_kv_native.py compares the two).
py::object kv_bytes(const py::list& layers) {
  int64_t counted = 0, batch = 0, tokens = 0, token_state = 0, reserved = 0;
  std::vector<std::pair<int64_t, const void*>> seen;  // (device, storage): a few dozen at most
  for (const py::handle item : layers) {
    auto entry = item.cast<py::tuple>();
    PyObject* pair[2] = {entry[0].ptr(), entry[1].ptr()};
    const int64_t hint = entry[2].cast<int64_t>();
    bool states = true;
    for (PyObject* o : pair) {
      if (!THPVariable_Check(o)) {
        states = false;
        break;
      }
      const at::Tensor& t = THPVariable_Unpack(o);
      if (t.dim() < 2 || t.numel() == 0) states = false;
    }
    if (!states) continue;
    const at::Tensor& k = THPVariable_Unpack(pair[0]);
    const int64_t positions = k.size(-2);
    const int64_t filled = hint < 0 ? positions : std::min(hint, positions);
    for (PyObject* o : pair) {
      const at::Tensor& t = THPVariable_Unpack(o);
      if (!t.has_storage() || t.storage().data() == nullptr) return py::none();
      token_state += filled * (static_cast<int64_t>(t.nbytes()) / t.size(-2));
      const auto& storage = t.storage();
      const std::pair<int64_t, const void*> key{t.is_cpu() ? -1 : t.get_device(), storage.data()};
      if (std::find(seen.begin(), seen.end(), key) == seen.end()) {
        seen.push_back(key);
        reserved += static_cast<int64_t>(storage.nbytes());
      }
    }
    if (counted++ == 0) batch = k.size(0);
    tokens = std::max(tokens, filled);
  }
  if (counted == 0) return py::none();
  return py::make_tuple(counted, batch, tokens, token_state, reserved);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attach", &attach, "attach the tracker to the CUDA caching allocator (once per process)");
#ifndef VRAMSCOPE_NO_CUDA
  m.def("device_counters", &device_counters, "the CUDA allocator's counters a step row keeps (a tuple)");
#endif
  m.def("start", &start, py::arg("device"), py::arg("stacks"), py::arg("max_depth"), py::arg("skip_prefix") = "");
  m.def("stop", &stop);
  m.def("set_stacks", &set_stacks);
  m.def("set_tag", &set_tag);
  m.def("get_tag", &get_tag);
  m.def("labels_from", &labels_from);
  m.def("forget_labels", &forget_labels, "drop the text of labels used once (markers), keeping their ids");
  m.def("drain", &drain);
  m.def("drain_codes", &drain_codes, py::arg("label"), py::arg("stack"), py::arg("action"), py::arg("stack_of"),
        py::arg("marker_step"), py::arg("n_labels"), py::arg("markers"), py::arg("n_actions"));
  m.def("record_for_test", &record_for_test);
  m.def("start_cpu", &start_cpu, py::arg("stacks"), py::arg("max_depth"), py::arg("skip_prefix"));
  m.def("stop_cpu", &stop_cpu);
  m.def("adopt", &adopt, "record a tensor's block that pre-dates the CPU capture");
  m.def("cpu_counters", &cpu_counters, "(allocated, peak) bytes: the replay of the CPU events");
  m.def("kv_bytes", &kv_bytes, "a KV cache's (layers, batch, tokens, token-state bytes, reserved bytes)");
  m.attr("reads_frames") = kFrames;
#if defined(VRAMSCOPE_TIME_PARTS)
  m.def("part_times", &part_times, "the calling thread's time per tracker part since the last call");
#endif
  m.attr("has_cpu") = true;
  // A forked child (a DataLoader worker) records nothing: its allocations are not ours.
  pthread_atfork(nullptr, nullptr, &cpu_off_in_child);
}
