// A reader of torch memory snapshot pickles that never builds the snapshot's object graph.
//
// It runs pickle's opcodes itself over a small value model (no code can run: an opcode that
// looks up a global, calls or builds an object is not in its table, and stops it). Two things
// keep memory near the pickle's size instead of several times it:
// - a list stored under the key "frames" (a traceback) becomes a stack handle as soon as it is
//   stored: its frame dicts' ordinals (at most the innermost 1,024) go into one flat array, and
//   a list shared by many entries (pickle's memo) is one handle;
// - a dict with an "action" key appended to a list (a trace entry) becomes one row of columns.
// Anything it does not take (another opcode, a changed handle or row, an integer out of range,
// an entry of another shape) stops it with a reason; the caller then reads the file with the
// standard unpickler, whose checks and errors are the reference. This file only reads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <malloc.h>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

constexpr size_t kMaxDepth = 1024;        // frames kept per stack (to_trace.MAX_STACK_DEPTH)
constexpr int kMaxNesting = 200;          // containers within containers when converting
constexpr size_t kMaxMemoGap = 1 << 20;   // a BINPUT this far past the memo's end is not pickle's

enum Kind : uint8_t { NONE, BOOL, INT, BIG, FLOAT, STR, OBJ, MARK };
struct Val {
  Kind k;
  int64_t i;  // INT, BOOL: the value; STR: string index; OBJ: object index; FLOAT: the bits
};
enum OKind : uint8_t { LIST, DICT, TUPLE, STACK, ROW };
struct Obj {
  OKind k;
  int32_t ordinal = -1;  // DICT: its index among frame dicts, once a stack holds it
  uint32_t id = 0;       // STACK: the handle (from 1); ROW: the row
  std::vector<Val> items;  // DICT: key, value, key, value...
};
enum Key : int8_t { K_OTHER, K_ACTION, K_ADDR, K_SIZE, K_STREAM, K_TIME, K_FRAMES, K_META };

// A growing array of frame ordinals in fixed chunks: no reallocation holds an old copy beside
// the new one (a vector's doubling would, for the largest thing read: every stack's frames).
// Two bytes a value while every ordinal fits (a snapshot of up to 65,536 distinct frames),
// widened to four once one does not.
class Chunked {
 public:
  void push_back(uint32_t v) {
    if (!wide_ && v > 0xffff) widen();
    if (n_ % kChunk == 0) wide_ ? new_chunk(wide32_) : new_chunk(narrow_);
    wide_ ? wide32_.back().push_back(v) : narrow_.back().push_back(static_cast<uint16_t>(v));
    ++n_;
  }
  uint32_t operator[](size_t j) const { return wide_ ? wide32_[j / kChunk][j % kChunk] : narrow_[j / kChunk][j % kChunk]; }
  size_t size() const { return n_; }

 private:
  static constexpr size_t kChunk = 1 << 20;
  template <class T>
  static void new_chunk(std::vector<std::vector<T>>& chunks) {
    chunks.emplace_back();
    chunks.back().reserve(kChunk);
  }
  void widen() {
    for (auto& c : narrow_) {  // a chunk at a time: the old one goes as the new one comes
      new_chunk(wide32_);
      wide32_.back().assign(c.begin(), c.end());
      std::vector<uint16_t>().swap(c);
    }
    narrow_.clear();
    wide_ = true;
  }
  bool wide_ = false;
  std::vector<std::vector<uint16_t>> narrow_;
  std::vector<std::vector<uint32_t>> wide32_;
  size_t n_ = 0;
};

struct Stop {
  std::string why;
};

class Scan {
 public:
  // "" when the whole file was read, else why the standard reader must read it.
  std::string run(const std::string& path, py::object progress, int64_t max_entries) {
    max_entries_ = max_entries;
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!f || std::fseek(f.get(), 0, SEEK_END) != 0) return "cannot open";
    file_size_ = std::ftell(f.get());
    std::rewind(f.get());
    file_ = f.get();
    std::string why;
    try {
      loop(progress);
    } catch (const Stop& s) {
      why = s.why;
    } catch (const std::bad_alloc&) {
      why = "out of memory";
    }
    file_ = nullptr;
    std::vector<char>().swap(buf_);
    std::vector<Val>().swap(stack_);
    marks_.clear();
    return why;
  }

  std::string top_dict_check() {
    if (result_.k != OBJ || objs_[result_.i].k != DICT) return "not a dict";
    return "";
  }

  // The snapshot as Python objects, device_traces aside (see device_rows); frames values are
  // stack handles (0: none). Raises a Stop-reason string through py::value_error.
  py::object convert_top() { return convert(result_, 0, false); }

  // For each device trace: the row of each entry, or a reason (a non-entry item).
  py::list device_rows() {
    py::list out;
    const Obj& top = objs_[result_.i];
    const Val* traces = nullptr;
    for (size_t j = 0; j + 1 < top.items.size(); j += 2)
      if (top.items[j].k == STR && strs_[top.items[j].i] == "device_traces") traces = &top.items[j + 1];
    if (!traces) return out;
    if (traces->k != OBJ || objs_[traces->i].k != LIST) throw py::value_error("device_traces that are not a list");
    int64_t total = 0;
    for (const Val& dev : objs_[traces->i].items) {
      if (dev.k != OBJ || objs_[dev.i].k != LIST) throw py::value_error("a device trace that is not a list");
      const auto& items = objs_[dev.i].items;
      total += items.size();
      if (total > max_entries_) throw py::value_error("more trace entries than the cap");
      py::array_t<int64_t> rows(items.size());
      auto r = rows.mutable_unchecked<1>();
      for (size_t n = 0; n < items.size(); ++n) {
        const Val& v = items[n];
        if (v.k != OBJ || objs_[v.i].k != ROW) throw py::value_error("a trace entry of another shape");
        r(n) = objs_[v.i].id;
      }
      out.append(rows);
    }
    return out;
  }

  // Column `name` of the rows (action and user_metadata: string indices, -1 for none).
  py::array_t<int64_t> column(const std::string& name) {
    const std::vector<int64_t>* c = name == "action" ? &action_ : name == "addr" ? &addr_
                                  : name == "size"     ? &size_ : name == "stream" ? &stream_
                                  : name == "time_us"  ? &time_ : name == "frames" ? &frames_
                                                       : &meta_;
    py::array_t<int64_t> a(c->size());
    if (!c->empty()) std::memcpy(a.mutable_data(), c->data(), c->size() * sizeof(int64_t));
    return a;
  }

  py::str string(int64_t i) { return decode(strs_.at(i)); }

  // The frame dicts stacks hold, by ordinal.
  py::list frame_dicts() {
    py::list out;
    for (uint32_t o : frame_objs_) {
      if (objs_[o].k != DICT) throw py::value_error("a frame that is not a dict");
      out.append(convert(Val{OBJ, o}, 0, false));
    }
    return out;
  }

  // Final ids for the stack handles in `order` (the order the tables are written in; 0: none),
  // as to_trace._Interner gives them: the frames' content keys are `ckey` (by ordinal), a stack
  // is its frames' ids, ids go to stacks and frames in order of first use. Returns (stack id
  // per position, -1 for none; the content keys in frame-id order; stacks cut to kMaxDepth).
  py::tuple finish(py::array_t<int64_t> order, py::array_t<int64_t> ckey) {
    auto ord = order.unchecked<1>();
    auto ck = ckey.unchecked<1>();
    if (ck.shape(0) != static_cast<py::ssize_t>(frame_objs_.size())) throw py::value_error("ckey size");
    std::vector<int64_t> handle_sid(offsets_.size(), -2);  // -2: not seen yet
    fid_of_ckey_.assign(frame_objs_.size(), -1);
    ckey_.assign(ck.data(0), ck.data(0) + ck.shape(0));
    std::vector<int64_t> frame_order;
    std::unordered_map<uint64_t, std::vector<uint32_t>> by_hash;  // hash -> stack ids
    py::array_t<int32_t> ids(ord.shape(0));
    auto out = ids.mutable_unchecked<1>();
    int64_t truncated = 0;
    std::vector<int32_t> seq;
    for (py::ssize_t n = 0; n < ord.shape(0); ++n) {
      int64_t h = ord(n);
      if (h <= 0 || h >= static_cast<int64_t>(offsets_.size())) {
        out(n) = -1;
        continue;
      }
      if (handle_sid[h] == -2) {
        truncated += cut_[h];
        sequence(h, seq, &frame_order);
        handle_sid[h] = seq.empty() ? -1 : stack_of(seq, h, by_hash);
      }
      out(n) = static_cast<int32_t>(handle_sid[h]);
    }
    py::array_t<int64_t> fo(frame_order.size());
    if (!frame_order.empty()) std::memcpy(fo.mutable_data(), frame_order.data(), frame_order.size() * 8);
    return py::make_tuple(ids, fo, truncated, rep_.size());
  }

  // Stacks [first, end) of finish's ids: (offsets, frame ids).
  py::tuple stacks(size_t first, size_t end) {
    std::vector<int64_t> offs{0};
    std::vector<int32_t> vals, seq;
    for (size_t s = first; s < end && s < rep_.size(); ++s) {
      sequence(rep_[s], seq, nullptr);
      vals.insert(vals.end(), seq.begin(), seq.end());
      offs.push_back(vals.size());
    }
    py::array_t<int64_t> o(offs.size());
    std::memcpy(o.mutable_data(), offs.data(), offs.size() * 8);
    py::array_t<int32_t> v(vals.size());
    if (!vals.empty()) std::memcpy(v.mutable_data(), vals.data(), vals.size() * 4);
    return py::make_tuple(o, v);
  }

  int64_t read_bytes() const { return done_; }

  // Everything read goes (finish's stack ids too), and the freed heap back to the system:
  // the many small vectors of a large pickle otherwise stay resident as free heap.
  void release() {
    *this = Scan();
    malloc_trim(0);
  }

 private:
  // -- reading ----------------------------------------------------------------------------
  const char* take(size_t n) {
    // Never more than the file holds: a length field is read before what it counts.
    if (n > static_cast<uint64_t>(file_size_ - done_)) throw Stop{"the pickle ends early"};
    if (len_ - pos_ < n) refill(n);
    const char* p = buf_.data() + pos_;
    pos_ += n;
    done_ += n;
    return p;
  }
  void refill(size_t n) {
    std::memmove(buf_.data(), buf_.data() + pos_, len_ - pos_);
    len_ -= pos_;
    pos_ = 0;
    if (buf_.size() < n || buf_.size() < (4u << 20)) buf_.resize(std::max(n, size_t(4) << 20));
    len_ += std::fread(buf_.data() + len_, 1, buf_.size() - len_, file_);
    if (len_ < n) throw Stop{"the pickle ends early"};
  }
  uint64_t le(size_t n) {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(take(n));
    uint64_t v = 0;
    for (size_t j = 0; j < n; ++j) v |= uint64_t(p[j]) << (8 * j);
    return v;
  }

  // -- the machine ------------------------------------------------------------------------
  Val pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) throw Stop{"stack underflow"};
    Val v = stack_.back();
    stack_.pop_back();
    return v;
  }
  size_t pop_mark() {
    if (marks_.empty()) throw Stop{"no mark"};
    size_t m = marks_.back();
    marks_.pop_back();
    return m;
  }
  Val new_obj(OKind k) {
    objs_.push_back(Obj{k});
    return Val{OBJ, static_cast<int64_t>(objs_.size() - 1)};
  }
  Obj& target(size_t at, OKind k) {
    if (at == 0 || at > stack_.size()) throw Stop{"stack underflow"};
    if (!marks_.empty() && at - 1 < marks_.back()) throw Stop{"stack underflow"};
    const Val& v = stack_[at - 1];
    if (v.k != OBJ || objs_[v.i].k != k) throw Stop{k == LIST ? "append to a non-list" : "setitem on a non-dict"};
    return objs_[v.i];
  }
  void push_str(std::string s) {
    Key key = K_OTHER;
    if (s.size() <= 13) {
      key = s == "action" ? K_ACTION : s == "addr" ? K_ADDR : s == "size" ? K_SIZE : s == "stream" ? K_STREAM
          : s == "time_us" ? K_TIME : s == "frames" ? K_FRAMES : s == "user_metadata" ? K_META : K_OTHER;
    }
    // Decoded now, as the standard unpickler does, so that a bad string stops here too.
    PyObject* check = PyUnicode_DecodeUTF8(s.data(), s.size(), "surrogatepass");
    if (!check) {
      PyErr_Clear();
      throw Stop{"a string that is not UTF-8"};
    }
    Py_DECREF(check);
    strs_.push_back(std::move(s));
    keys_.push_back(key);
    stack_.push_back(Val{STR, static_cast<int64_t>(strs_.size() - 1)});
  }
  void memo_put(uint64_t at) {
    if (stack_.empty()) throw Stop{"memo of an empty stack"};
    if (at >= memo_.size()) {
      if (at > memo_.size() + kMaxMemoGap) throw Stop{"a memo index far past the memo"};
      memo_.resize(at + 1, Val{MARK, 0});
    }
    memo_[at] = stack_.back();
  }
  void memo_get(uint64_t at) {
    if (at >= memo_.size() || memo_[at].k == MARK) throw Stop{"a memo index never stored"};
    stack_.push_back(memo_[at]);
  }

  void loop(py::object progress);
  void set_items(size_t from);
  void append_items(size_t from);
  void to_row(Obj& d);
  uint32_t intern(Obj& list);
  int64_t stack_of(const std::vector<int32_t>& seq, int64_t h,
                   std::unordered_map<uint64_t, std::vector<uint32_t>>& by_hash);
  void sequence(int64_t h, std::vector<int32_t>& seq, std::vector<int64_t>* frame_order);
  py::object convert(const Val& v, int depth, bool is_frames);
  static py::str decode(const std::string& s) {
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), s.size(), "surrogatepass");
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(o);
  }

  FILE* file_ = nullptr;
  std::vector<char> buf_;
  size_t pos_ = 0, len_ = 0;
  int64_t done_ = 0, file_size_ = 0, max_entries_ = 0;
  std::vector<Val> stack_, memo_;
  std::vector<size_t> marks_;
  std::deque<Obj> objs_;  // a deque: growing never copies what is there
  std::vector<std::string> strs_;
  std::vector<Key> keys_;
  Val result_{NONE, 0};
  // Stacks: handle h's frame ordinals are values_[offsets_[h-1]..offsets_[h]); cut_: deeper than kMaxDepth.
  std::vector<uint64_t> offsets_{0};
  Chunked values_;
  std::vector<uint8_t> cut_{0};
  std::vector<uint32_t> frame_objs_;  // ordinal -> object
  std::vector<int64_t> fid_of_ckey_, ckey_;
  std::vector<int64_t> rep_;  // stack id -> a handle with its frames
  // Rows (trace entries).
  std::vector<int64_t> action_, addr_, size_, stream_, time_, frames_, meta_;
};

#include "pickle_scan_impl.h"

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Scan>(m, "Scan")
      .def(py::init<>())
      .def("run", &Scan::run)
      .def("top_dict_check", &Scan::top_dict_check)
      .def("convert_top", &Scan::convert_top)
      .def("device_rows", &Scan::device_rows)
      .def("column", &Scan::column)
      .def("string", &Scan::string)
      .def("frame_dicts", &Scan::frame_dicts)
      .def("finish", &Scan::finish)
      .def("stacks", &Scan::stacks)
      .def("read_bytes", &Scan::read_bytes)
      .def("release", &Scan::release);
}
