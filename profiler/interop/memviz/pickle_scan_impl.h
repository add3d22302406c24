// The opcode loop and the conversions of pickle_scan.cpp (included there, inside its namespace).

void Scan::loop(py::object progress) {
  int64_t next_report = 16 << 20;
  for (;;) {
    if (!progress.is_none() && done_ >= next_report) {
      progress(done_);
      next_report = done_ + (16 << 20);
    }
    unsigned char op = static_cast<unsigned char>(*take(1));
    switch (op) {
      case 0x80: if (le(1) > 5) throw Stop{"an unknown protocol"}; break;  // PROTO
      case 0x95: {  // FRAME: the unpickler reads the whole frame first, so it must be there
        if (le(8) > static_cast<uint64_t>(file_size_ - done_)) throw Stop{"a frame longer than the file"};
        break;
      }
      case '.':  // STOP
        result_ = pop();
        if (!progress.is_none()) progress(done_);
        return;
      case '(': marks_.push_back(stack_.size()); break;     // MARK
      case '}': stack_.push_back(new_obj(DICT)); break;     // EMPTY_DICT
      case ']': stack_.push_back(new_obj(LIST)); break;     // EMPTY_LIST
      case ')': stack_.push_back(new_obj(TUPLE)); break;    // EMPTY_TUPLE
      case 't': case 0x85: case 0x86: case 0x87: {          // TUPLE, TUPLE1..3
        size_t from = op == 't' ? pop_mark() : stack_.size() - std::min<size_t>(op - 0x84, stack_.size());
        if (op != 't' && (stack_.size() - from != size_t(op - 0x84) ||
                          (!marks_.empty() && from < marks_.back())))
          throw Stop{"stack underflow"};
        Val t = new_obj(TUPLE);
        objs_[t.i].items.assign(stack_.begin() + from, stack_.end());
        stack_.resize(from);
        stack_.push_back(t);
        break;
      }
      case 0x94: memo_put(memo_.size()); break;             // MEMOIZE
      case 'q': memo_put(le(1)); break;                     // BINPUT
      case 'r': memo_put(le(4)); break;                     // LONG_BINPUT
      case 'h': memo_get(le(1)); break;                     // BINGET
      case 'j': memo_get(le(4)); break;                     // LONG_BINGET
      case 's': set_items(stack_.size() - std::min<size_t>(2, stack_.size())); break;  // SETITEM
      case 'u': set_items(pop_mark()); break;               // SETITEMS
      case 'a': append_items(stack_.size() - std::min<size_t>(1, stack_.size())); break;  // APPEND
      case 'e': append_items(pop_mark()); break;            // APPENDS
      case 'J': stack_.push_back(Val{INT, static_cast<int32_t>(le(4))}); break;  // BININT
      case 'K': stack_.push_back(Val{INT, static_cast<int64_t>(le(1))}); break;  // BININT1
      case 'M': stack_.push_back(Val{INT, static_cast<int64_t>(le(2))}); break;  // BININT2
      case 0x8a: {                                          // LONG1
        size_t n = le(1);
        if (n > 8) {
          take(n);
          stack_.push_back(Val{BIG, 0});
          break;
        }
        uint64_t v = n ? le(n) : 0;
        if (n && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t(0) << (8 * n);  // sign-extend
        stack_.push_back(Val{INT, static_cast<int64_t>(v)});
        break;
      }
      case 0x8b: take(le(4)); stack_.push_back(Val{BIG, 0}); break;  // LONG4
      case 'N': stack_.push_back(Val{NONE, 0}); break;
      case 0x88: stack_.push_back(Val{BOOL, 1}); break;     // NEWTRUE
      case 0x89: stack_.push_back(Val{BOOL, 0}); break;     // NEWFALSE
      case 'G': {                                           // BINFLOAT: big-endian
        const unsigned char* p = reinterpret_cast<const unsigned char*>(take(8));
        uint64_t bits = 0;
        for (int j = 0; j < 8; ++j) bits = (bits << 8) | p[j];
        stack_.push_back(Val{FLOAT, static_cast<int64_t>(bits)});
        break;
      }
      case 0x8c: case 'X': case 0x8d: {                     // SHORT_BINUNICODE, BINUNICODE(8)
        uint64_t n = le(op == 0x8c ? 1 : op == 'X' ? 4 : 8);
        if (n > (uint64_t(1) << 36)) throw Stop{"a string longer than a snapshot holds"};
        const char* p = take(n);
        push_str(std::string(p, n));
        break;
      }
      case '0': pop(); break;                               // POP
      case '1': stack_.resize(pop_mark()); break;           // POP_MARK
      case '2': stack_.push_back(pop()); stack_.push_back(stack_.back()); break;  // DUP
      default: {
        char why[64];
        std::snprintf(why, sizeof why, "opcode 0x%02x at byte %lld", op, static_cast<long long>(done_ - 1));
        throw Stop{why};
      }
    }
  }
}

void Scan::set_items(size_t from) {
  if ((stack_.size() - from) % 2) throw Stop{"setitems of an odd count"};
  Obj& d = target(from, DICT);
  for (size_t j = from; j < stack_.size(); j += 2) {
    Val& value = stack_[j + 1];
    const Val& key = stack_[j];
    // A container key is refused by the unpickler (unhashable); a tuple may hold one.
    if (key.k == OBJ) throw Stop{"a dict key that is a container"};
    if (key.k == STR && keys_[key.i] == K_FRAMES && value.k == OBJ && objs_[value.i].k == LIST) {
      uint32_t h = intern(objs_[value.i]);
      objs_[value.i].k = STACK;
      objs_[value.i].id = h;
    }
    d.items.push_back(key);
    d.items.push_back(value);
  }
  stack_.resize(from);
}

void Scan::append_items(size_t from) {
  Obj& l = target(from, LIST);
  for (size_t j = from; j < stack_.size(); ++j) {
    const Val& v = stack_[j];
    if (v.k == OBJ && objs_[v.i].k == DICT) {
      Obj& d = objs_[v.i];
      for (size_t k = 0; k < d.items.size(); k += 2)
        if (d.items[k].k == STR && keys_[d.items[k].i] == K_ACTION) {
          to_row(d);
          break;
        }
    }
    l.items.push_back(v);
  }
  stack_.resize(from);
}

// A trace entry's fields as to_trace reads them (a missing or None field is 0; the last of
// a key given twice wins, as in a dict); a field the import would refuse stops the scan.
void Scan::to_row(Obj& d) {
  if (d.ordinal >= 0) throw Stop{"a frame with an action"};
  int64_t f[7] = {-1, 0, 0, 0, 0, 0, -1};  // action, addr, size, stream, time_us, frames, meta
  for (size_t k = 0; k < d.items.size(); k += 2) {
    const Val& key = d.items[k];
    const Val& v = d.items[k + 1];
    if (key.k != STR) continue;
    Key which = keys_[key.i];
    if (which == K_ACTION) {
      if (v.k != STR) throw Stop{"an action that is not a string"};
      f[0] = v.i;
    } else if (which == K_ADDR || which == K_SIZE || which == K_TIME || which == K_STREAM) {
      int slot = which == K_ADDR ? 1 : which == K_SIZE ? 2 : which == K_STREAM ? 3 : 4;
      if (v.k == NONE) f[slot] = 0;
      else if (v.k == INT && (v.i >= 0 || which == K_STREAM)) f[slot] = v.i;
      else throw Stop{"an entry field the import refuses"};
    } else if (which == K_FRAMES) {
      if (v.k == NONE) f[5] = 0;
      else if (v.k == OBJ && objs_[v.i].k == STACK) f[5] = objs_[v.i].id;
      else throw Stop{"entry frames that are not a list"};
    } else if (which == K_META) {
      f[6] = v.k == STR ? v.i : -1;
    }
  }
  if (static_cast<int64_t>(action_.size()) >= max_entries_) throw Stop{"more trace entries than the cap"};
  d.k = ROW;
  d.id = static_cast<uint32_t>(action_.size());
  action_.push_back(f[0]);
  addr_.push_back(f[1]);
  size_.push_back(f[2]);
  stream_.push_back(f[3]);
  time_.push_back(f[4]);
  frames_.push_back(f[5]);
  meta_.push_back(f[6]);
  std::vector<Val>().swap(d.items);
}

// A traceback's handle: its first kMaxDepth items that are dicts, by ordinal (as
// _Interner keeps frames[:MAX_STACK_DEPTH] if isinstance(f, dict)).
uint32_t Scan::intern(Obj& list) {
  size_t n = std::min(list.items.size(), kMaxDepth);
  for (size_t j = 0; j < n; ++j) {
    const Val& v = list.items[j];
    if (v.k != OBJ) continue;
    Obj& f = objs_[v.i];
    if (f.k == ROW) throw Stop{"a trace entry inside a traceback"};
    if (f.k != DICT) continue;
    if (f.ordinal < 0) {
      f.ordinal = static_cast<int32_t>(frame_objs_.size());
      frame_objs_.push_back(static_cast<uint32_t>(v.i));
    }
    values_.push_back(static_cast<uint32_t>(f.ordinal));
  }
  offsets_.push_back(values_.size());
  cut_.push_back(list.items.size() > kMaxDepth);
  std::vector<Val>().swap(list.items);
  return static_cast<uint32_t>(offsets_.size() - 1);
}

// Handle h's frame ids; new content keys get the next frame id (frame_order, when given).
void Scan::sequence(int64_t h, std::vector<int32_t>& seq, std::vector<int64_t>* frame_order) {
  seq.clear();
  for (uint64_t j = offsets_[h - 1]; j < offsets_[h]; ++j) {
    int64_t c = ckey_[values_[j]];
    if (c < 0 || c >= static_cast<int64_t>(fid_of_ckey_.size())) throw py::value_error("a frame key out of range");
    if (fid_of_ckey_[c] < 0) {
      fid_of_ckey_[c] = frame_order ? static_cast<int64_t>(frame_order->size()) : -1;
      if (frame_order) frame_order->push_back(c);
    }
    seq.push_back(static_cast<int32_t>(fid_of_ckey_[c]));
  }
}

int64_t Scan::stack_of(const std::vector<int32_t>& seq, int64_t h,
                       std::unordered_map<uint64_t, std::vector<uint32_t>>& by_hash) {
  uint64_t hash = 1469598103934665603ull;
  for (int32_t x : seq) hash = (hash ^ static_cast<uint32_t>(x)) * 1099511628211ull;
  auto& same = by_hash[hash];
  std::vector<int32_t> other;
  for (uint32_t sid : same) {
    sequence(rep_[sid], other, nullptr);
    if (other == seq) return sid;
  }
  rep_.push_back(h);
  same.push_back(static_cast<uint32_t>(rep_.size() - 1));
  return static_cast<int64_t>(rep_.size() - 1);
}

// Python objects for a value. Shared containers stay shared (each object is converted once),
// so nothing shared is expanded; a stack is its handle only where it is a frames value.
py::object Scan::convert(const Val& v, int depth, bool is_frames) {
  switch (v.k) {
    case NONE: return py::none();
    case BOOL: return py::bool_(v.i != 0);
    case INT: return py::int_(v.i);
    case FLOAT: {
      double d;
      std::memcpy(&d, &v.i, 8);
      return py::float_(d);
    }
    case STR: return decode(strs_[v.i]);
    case OBJ: break;
    default: throw py::value_error("an integer wider than 64 bits");
  }
  if (depth > kMaxNesting) throw py::value_error("nested too deeply");
  static thread_local std::unordered_map<int64_t, py::object>* cache = nullptr;
  std::unordered_map<int64_t, py::object> local;
  bool owner = cache == nullptr;
  if (owner) cache = &local;
  struct Reset {
    bool owner;
    ~Reset() {
      if (owner) cache = nullptr;
    }
  } reset{owner};
  auto found = cache->find(v.i);
  if (found != cache->end()) return found->second;
  Obj& o = objs_[v.i];
  if (o.k == STACK) {
    if (!is_frames) throw py::value_error("a traceback used as another value");
    return py::int_(o.id);
  }
  if (o.k == ROW) throw py::value_error("a trace entry outside device_traces");
  if (o.k == TUPLE) {
    py::list items;
    for (const Val& x : o.items) items.append(convert(x, depth + 1, false));
    py::object t = py::tuple(items);
    (*cache)[v.i] = t;
    return t;
  }
  if (o.k == LIST) {
    py::list l;
    (*cache)[v.i] = l;
    for (const Val& x : o.items) l.append(convert(x, depth + 1, false));
    return std::move(l);
  }
  py::dict d;
  (*cache)[v.i] = d;
  for (size_t k = 0; k < o.items.size(); k += 2) {
    const Val& key = o.items[k];
    bool frames = key.k == STR && keys_[key.i] == K_FRAMES;
    const Val& raw = o.items[k + 1];
    if (frames && raw.k != NONE && !(raw.k == OBJ && objs_[raw.i].k == STACK))
      throw py::value_error("frames that are not a list");
    // device_traces are read as columns (device_rows): here a placeholder.
    bool traces = depth == 0 && key.k == STR && strs_[key.i] == "device_traces";
    py::object value = traces ? py::none() : convert(raw, depth + 1, frames);
    if (PyDict_SetItem(d.ptr(), convert(key, depth + 1, false).ptr(), value.ptr()) < 0) {
      PyErr_Clear();
      throw py::value_error("a dict key that is not hashable");
    }
  }
  return std::move(d);
}
