// The emulator's hot path in C++: an op on virtual tensors whose signature Python has already worked out.
//
// Registered for a list of aten ops on the Python dispatch key, in place of PyTorch's Python fallback,
// it builds the op's cache key from its arguments (each virtual tensor's Meta number), and on a hit makes
// the output wrapper itself and asks Python only to account the launch (clock, op log). Anything else
// (a miss, an argument it cannot key, a dispatch mode on the stack, the emulator off) goes to Python as
// the fallback would: `VTensor.__torch_dispatch__`, which offers what it decided for the next call.
// Python drives it through ctypes (replayer/hot_path.py); every entry point expects the GIL held.
//
// It also holds the C twins of replayer/memory.py's `Counts` and `Storage` (what the virtual allocator counts,
// and a virtual storage), which the hot path makes a new output's storage with, without calling Python.
#include <Python.h>
#include <structmember.h>

#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/PyInterpreter.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// The output's tensor, as `_make_wrapper_subclass(VTensor, shape, stride, offset, None, dtype, strided, device)`
// makes it: read once from those arguments.
struct Layout {
  std::vector<int64_t> sizes, strides;
  int64_t offset = 0;
  size_t nbytes = 0;  // the wrapper's own (data-less) storage: what its sizes and strides reach
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::Device(at::kCPU);
};

struct Entry {
  PyObject* sig;           // the Signature, handed to `account`
  PyObject* meta;          // the output's Meta: its `_d`
  PyObject* wrap_args;     // the output's arguments to `_make_wrapper_subclass`
  PyObject* storage_args;  // (nbytes, allocator, None) for a new output; None for a view of the first argument
  bool values;             // the output's value is computed from the inputs' when they all hold one
  Layout layout;
};

struct State {
  bool on = false;
  PyObject* vtensor = nullptr;
  PyObject* make_wrapper = nullptr;  // torch.Tensor._make_wrapper_subclass
  PyObject* account = nullptr;       // account(sig): the launch on the clock, the op counted and logged
  PyObject* account_value = nullptr;  // the same, for an op whose value was computed here
  PyObject* clock = nullptr;          // its `captures`: threads capturing a CUDA graph (values then in Python)
  // a list Python's generic path fills: [func, sig, meta, wrap_args, storage_args, values, thread ident]
  PyObject* offered = nullptr;
  PyObject* s_d = nullptr;
  PyObject* s_n = nullptr;
  PyObject* s_vstorage = nullptr;
  PyObject* s_value = nullptr;
  PyObject* s_value_of_storage = nullptr;
  PyObject* s_captures = nullptr;
  std::unordered_map<std::string, Entry> cache;
  std::unordered_map<const c10::FunctionSchema*, PyObject*> funcs;  // registered ops -> their OpOverload
  std::unique_ptr<torch::Library> lib;
  long long hits = 0;
};

State S;

// PyTorch's Python fallback runs __torch_dispatch__ with every key below Python excluded but these.
const c10::DispatchKeySet kBelowPython =
    (c10::DispatchKeySet(c10::DispatchKeySet::FULL) ^
     (c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::Python) |
      c10::DispatchKeySet(c10::DispatchKey::Python)))
        .remove(c10::DispatchKey::ZeroTensor)
        .remove(c10::DispatchKey::Conjugate)
        .remove(c10::DispatchKey::Negative);

void to_python(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard guard(kBelowPython);
  auto* interpreter = c10::impl::getGlobalPyInterpreter();
  TORCH_INTERNAL_ASSERT(interpreter != nullptr, "revati hot path: no Python interpreter");
  (*interpreter)->dispatch(op, stack);
}

template <typename T>
void put(std::string& key, char tag, T value) {
  key.push_back(tag);
  key.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

PyObject* python_object(const at::Tensor& t) { return t.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj(); }

// The Meta number of a virtual tensor, or -1 for any other tensor.
long long number(const at::Tensor& t) {
  PyObject* obj = python_object(t);
  if (obj == nullptr || reinterpret_cast<PyObject*>(Py_TYPE(obj)) != S.vtensor) {
    return -1;
  }
  PyObject* d = PyObject_GetAttr(obj, S.s_d);
  if (d == nullptr) {
    PyErr_Clear();
    return -1;
  }
  PyObject* n = PyObject_GetAttr(d, S.s_n);
  Py_DECREF(d);
  if (n == nullptr) {
    PyErr_Clear();
    return -1;
  }
  long long value = PyLong_AsLongLong(n);
  Py_DECREF(n);
  return value;
}

bool put_tensor(std::string& key, const at::Tensor& t) {
  if (!t.defined()) {
    key.push_back('u');
    return true;
  }
  long long n = number(t);
  if (n >= 0) {
    put(key, 't', n);
    return true;
  }
  // A Python number the op takes as a tensor (`x + 1e-5`: a 0-dim wrapped number): keyed by its value.
  if (!t.unsafeGetTensorImpl()->is_wrapped_number() || !t.is_cpu()) {
    return false;
  }
  switch (t.scalar_type()) {
    case at::kDouble:
      put(key, 'F', *t.const_data_ptr<double>());
      return true;
    case at::kLong:
      put(key, 'I', *t.const_data_ptr<int64_t>());
      return true;
    case at::kBool:
      put(key, 'B', *t.const_data_ptr<bool>());
      return true;
    default:
      return false;
  }
}

// Append an argument's part of the key; false for an argument the hot path does not key.
bool put_arg(std::string& key, const c10::IValue& v) {
  if (v.isTensor()) {
    return put_tensor(key, v.toTensor());
  }
  if (v.isNone()) {
    key.push_back('n');
    return true;
  }
  if (v.isInt()) {
    put(key, 'i', v.toInt());
    return true;
  }
  if (v.isBool()) {
    put(key, 'b', v.toBool());
    return true;
  }
  if (v.isDouble()) {
    put(key, 'f', v.toDouble());
    return true;
  }
  if (v.isIntList()) {
    auto list = v.toIntList();
    put(key, 'L', static_cast<int64_t>(list.size()));
    for (int64_t x : list) {
      key.append(reinterpret_cast<const char*>(&x), sizeof(x));
    }
    return true;
  }
  if (v.isString()) {
    const std::string& text = v.toStringRef();
    put(key, 's', static_cast<int64_t>(text.size()));
    key += text;
    return true;
  }
  if (v.isDevice()) {
    auto d = v.toDevice();
    put(key, 'd', static_cast<int32_t>(d.type()) * 1024 + d.index());
    return true;
  }
  if (v.isTensorList()) {
    const auto& list = v.toListRef();
    put(key, 'T', static_cast<int64_t>(list.size()));
    for (const auto& t : list) {
      if (!put_tensor(key, t.toTensor())) {
        return false;
      }
    }
    return true;
  }
  return false;
}

void set(PyObject* obj, PyObject* name, PyObject* value) {
  if (PyObject_SetAttr(obj, name, value) != 0) {
    throw python_error();
  }
}

// Whether `obj.name` is not None.
bool is_set(PyObject* obj, PyObject* name) {
  PyObject* v = PyObject_GetAttr(obj, name);
  if (v == nullptr) {
    throw python_error();
  }
  bool set = v != Py_None;
  Py_DECREF(v);
  return set;
}

// Whether a virtual tensor holds a value: its own (`_value`) and its storage's (`_vstorage.value`).
bool valued(const at::Tensor& t) {
  if (t.is_cpu()) {
    return true;  // a Python number (a wrapped number: the only host tensor a key admits)
  }
  PyObject* obj = python_object(t);
  if (!is_set(obj, S.s_value)) {
    return false;
  }
  PyObject* storage = PyObject_GetAttr(obj, S.s_vstorage);
  if (storage == nullptr) {
    throw python_error();
  }
  bool known = is_set(storage, S.s_value_of_storage);
  Py_DECREF(storage);
  return known;
}

// Whether every tensor among the arguments holds a value (keyed arguments are virtual tensors or lists).
bool all_valued(torch::jit::Stack* stack, size_t nargs) {
  for (const auto& v : torch::jit::last(*stack, nargs)) {
    if (v.isTensor()) {
      if (v.toTensor().defined() && !valued(v.toTensor())) {
        return false;
      }
    } else if (v.isTensorList()) {
      for (const auto& t : v.toListRef()) {
        if (!valued(t.toTensor())) {
          return false;
        }
      }
    }
  }
  return true;
}

// The value of a virtual tensor (`_value`, a CPU tensor), for a tensor that holds one.
at::Tensor value_of(const at::Tensor& t) {
  PyObject* v = PyObject_GetAttr(python_object(t), S.s_value);
  if (v == nullptr) {
    throw python_error();
  }
  at::Tensor value = THPVariable_Unpack(v);
  Py_DECREF(v);
  return value;
}

// The op run on the arguments' values (the CPU tensors every virtual one among them holds): the output's value,
// as Python's path computes it.
PyObject* compute(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t nargs) {
  torch::jit::Stack cpu;
  cpu.reserve(nargs);
  for (const auto& v : torch::jit::last(*stack, nargs)) {
    if (v.isTensor() && v.toTensor().defined() && !v.toTensor().is_cpu()) {
      cpu.emplace_back(value_of(v.toTensor()));
    } else if (v.isTensorList()) {
      c10::List<at::Tensor> values;
      for (const auto& t : v.toListRef()) {
        values.push_back(value_of(t.toTensor()));
      }
      cpu.emplace_back(std::move(values));
    } else if (v.isDevice()) {
      cpu.emplace_back(c10::Device(c10::kCPU));
    } else {
      cpu.push_back(v);
    }
  }
  {
    c10::impl::ExcludeDispatchKeyGuard guard(kBelowPython);  // as __torch_dispatch__ runs
    op.callBoxed(cpu);
  }
  return THPVariable_Wrap(cpu.at(0).toTensor());
}

// ---- Virtual memory: the C twins of replayer/memory.py's `Counts` and `Storage` (same fields, same rules) ----

struct Counts {
  PyObject_HEAD
  long long usable, allocated, peak, reserved, peak_reserved, num_allocs, num_ooms;
  PyObject* on_oom;  // on_oom(size): the OutOfMemoryError to raise for an allocation of `size` bytes
};

struct VStorage {
  PyObject_HEAD
  long long nbytes;
  long long size;     // the bytes counted against `counts` (rounded), freed with the storage
  PyObject* counts;   // a Counts (or anything with alloc(nbytes) and free(size)), or null: nothing counted
  PyObject* value;    // the shadow value's CPU storage (or True), or null: the contents are unknown
  PyObject* weakrefs;
};

PyTypeObject* CountsType = nullptr;
PyTypeObject* StorageType = nullptr;
constexpr long long kRound = 512;  // the CUDA caching allocator rounds requests up to 512 bytes

// Count an allocation of `nbytes`: its rounded size, or -1 with the virtual OutOfMemoryError raised.
long long counts_alloc(Counts* c, long long nbytes) {
  long long size = (nbytes + kRound - 1) / kRound * kRound;
  long long allocated = c->allocated + size;
  if (allocated > c->usable) {
    c->num_ooms++;
    PyObject* exc = PyObject_CallFunction(c->on_oom, "L", size);
    if (exc != nullptr) {
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
      Py_DECREF(exc);
    }
    return -1;
  }
  c->allocated = allocated;
  c->num_allocs++;
  if (allocated > c->peak) {
    c->peak = allocated;
    if (allocated > c->reserved) {  // a caching allocator keeps what it once held
      c->reserved = allocated;
      if (allocated > c->peak_reserved) {
        c->peak_reserved = allocated;
      }
    }
  }
  return size;
}

int counts_init(PyObject* self, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"usable", "on_oom", nullptr};
  Counts* c = reinterpret_cast<Counts*>(self);
  PyObject* on_oom = nullptr;
  long long usable = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LO", const_cast<char**>(names), &usable, &on_oom)) {
    return -1;
  }
  c->usable = usable;
  c->allocated = c->peak = c->reserved = c->peak_reserved = c->num_allocs = c->num_ooms = 0;
  Py_INCREF(on_oom);
  Py_XSETREF(c->on_oom, on_oom);
  return 0;
}

PyObject* counts_alloc_method(PyObject* self, PyObject* arg) {
  long long nbytes = PyLong_AsLongLong(arg);
  if (nbytes == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  long long size = counts_alloc(reinterpret_cast<Counts*>(self), nbytes);
  return size < 0 ? nullptr : PyLong_FromLongLong(size);
}

PyObject* counts_free_method(PyObject* self, PyObject* arg) {
  long long size = PyLong_AsLongLong(arg);
  if (size == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  reinterpret_cast<Counts*>(self)->allocated -= size;
  Py_RETURN_NONE;
}

int counts_traverse(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(reinterpret_cast<Counts*>(self)->on_oom);  // an allocator's bound method: a cycle through it
  Py_VISIT(Py_TYPE(self));
  return 0;
}

int counts_clear(PyObject* self) {
  Py_CLEAR(reinterpret_cast<Counts*>(self)->on_oom);
  return 0;
}

void counts_dealloc(PyObject* self) {
  PyTypeObject* type = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  counts_clear(self);
  type->tp_free(self);
  Py_DECREF(type);
}

#define COUNT(name) {#name, T_LONGLONG, offsetof(Counts, name), 0, nullptr}
PyMemberDef counts_members[] = {
    COUNT(usable), COUNT(allocated), COUNT(peak), COUNT(reserved), COUNT(peak_reserved), COUNT(num_allocs),
    COUNT(num_ooms), {"on_oom", T_OBJECT, offsetof(Counts, on_oom), READONLY, nullptr}, {nullptr}};
#undef COUNT

PyMethodDef counts_methods[] = {
    {"alloc", counts_alloc_method, METH_O, "Count nbytes allocated: the rounded size (OutOfMemoryError past usable)."},
    {"free", counts_free_method, METH_O, "Count size bytes freed."},
    {nullptr}};

PyType_Slot counts_slots[] = {
    {Py_tp_doc, const_cast<char*>("What the virtual allocator counts: bytes live, peaks, allocations, OOMs.")},
    {Py_tp_new, reinterpret_cast<void*>(PyType_GenericNew)},
    {Py_tp_init, reinterpret_cast<void*>(counts_init)},
    {Py_tp_dealloc, reinterpret_cast<void*>(counts_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(counts_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(counts_clear)},
    {Py_tp_members, counts_members},
    {Py_tp_methods, counts_methods},
    {0, nullptr}};

PyType_Spec counts_spec = {"replayer.memory.Counts", sizeof(Counts), 0,
                           Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, counts_slots};

// A new storage of `nbytes`, counted against `counts` (None: nothing counted), with `value` (None: unknown).
PyObject* new_storage(long long nbytes, PyObject* counts, PyObject* value) {
  PyObject* obj = StorageType->tp_alloc(StorageType, 0);
  if (obj == nullptr) {
    return nullptr;
  }
  VStorage* st = reinterpret_cast<VStorage*>(obj);
  st->nbytes = nbytes;
  if (value != Py_None) {
    Py_INCREF(value);
    st->value = value;
  }
  if (counts != Py_None) {
    Py_INCREF(counts);
    st->counts = counts;
    if (nbytes != 0) {
      long long size;
      if (Py_TYPE(counts) == CountsType) {
        size = counts_alloc(reinterpret_cast<Counts*>(counts), nbytes);
      } else {
        PyObject* r = PyObject_CallMethod(counts, "alloc", "L", nbytes);
        size = r == nullptr ? -1 : PyLong_AsLongLong(r);
        Py_XDECREF(r);
      }
      if (size < 0) {
        Py_DECREF(obj);  // nothing counted: its dealloc frees nothing
        return nullptr;
      }
      st->size = size;
    }
  }
  return obj;
}

PyObject* storage_new(PyTypeObject*, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"nbytes", "allocator", "value", nullptr};
  long long nbytes = 0;
  PyObject* counts = nullptr;
  PyObject* value = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LO|O", const_cast<char**>(names), &nbytes, &counts, &value)) {
    return nullptr;
  }
  return new_storage(nbytes, counts, value);
}

int storage_traverse(PyObject* self, visitproc visit, void* arg) {
  VStorage* st = reinterpret_cast<VStorage*>(self);
  Py_VISIT(st->value);
  Py_VISIT(st->counts);
  Py_VISIT(Py_TYPE(self));
  return 0;
}

int storage_clear(PyObject* self) {
  Py_CLEAR(reinterpret_cast<VStorage*>(self)->value);  // its counts stay: the dealloc frees its bytes there
  return 0;
}

void storage_dealloc(PyObject* self) {
  PyTypeObject* type = Py_TYPE(self);
  VStorage* st = reinterpret_cast<VStorage*>(self);
  PyObject_GC_UnTrack(self);
  if (st->weakrefs != nullptr) {
    PyObject_ClearWeakRefs(self);
  }
  if (st->size != 0 && st->counts != nullptr) {
    if (Py_TYPE(st->counts) == CountsType) {
      reinterpret_cast<Counts*>(st->counts)->allocated -= st->size;
    } else {
      PyObject *type_, *value_, *tb;
      PyErr_Fetch(&type_, &value_, &tb);
      PyObject* r = PyObject_CallMethod(st->counts, "free", "L", st->size);
      if (r == nullptr) {
        PyErr_WriteUnraisable(self);
      }
      Py_XDECREF(r);
      PyErr_Restore(type_, value_, tb);
    }
  }
  Py_CLEAR(st->value);
  Py_CLEAR(st->counts);
  type->tp_free(self);
  Py_DECREF(type);
}

PyMemberDef storage_members[] = {
    {"nbytes", T_LONGLONG, offsetof(VStorage, nbytes), READONLY, nullptr},
    {"_size", T_LONGLONG, offsetof(VStorage, size), READONLY, nullptr},
    {"_allocator", T_OBJECT, offsetof(VStorage, counts), READONLY, nullptr},
    {"value", T_OBJECT, offsetof(VStorage, value), 0, nullptr},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(VStorage, weakrefs), READONLY, nullptr},
    {nullptr}};

PyType_Slot storage_slots[] = {
    {Py_tp_doc, const_cast<char*>("A virtual storage: its bytes count against the allocator while it lives.")},
    {Py_tp_new, reinterpret_cast<void*>(storage_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(storage_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(storage_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(storage_clear)},
    {Py_tp_members, storage_members},
    {0, nullptr}};

PyType_Spec storage_spec = {"replayer.memory.Storage", sizeof(VStorage), 0,
                            Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, storage_slots};

// Whether this torch wraps a tensor in a given Python class (`THPVariable_Wrap(tensor, type)`, as its own
// `_make_wrapper_subclass` does). Where it does not, outputs are made by calling that from here.
template <typename T>
concept WrapsAs = requires(const T& t, PyTypeObject* type) { THPVariable_Wrap(t, type); };
constexpr bool kWrapsAs = WrapsAs<at::TensorBase>;

template <typename T>
PyObject* wrap_as(const T& t, PyObject* type) {
  if constexpr (WrapsAs<T>) {
    return THPVariable_Wrap(t, reinterpret_cast<PyTypeObject*>(type));
  } else {
    return nullptr;
  }
}

// A new VTensor with the layout, over no data: what `_make_wrapper_subclass` makes, without its argument
// parser (half an op's cost here).
PyObject* make_output(const Entry& e) {
  if constexpr (!kWrapsAs) {
    return PyObject_Call(S.make_wrapper, e.wrap_args, nullptr);
  }
  const Layout& l = e.layout;
  at::Tensor t;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    c10::Storage storage{c10::Storage::use_byte_size_t{}, static_cast<int64_t>(l.nbytes),
                         at::DataPtr{nullptr, l.device}, c10::GetAllocator(c10::kMeta), /*resizable=*/true};
    auto options = at::TensorOptions().dtype(l.dtype).device(l.device).layout(at::kStrided);
    t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(options.computeDispatchKey()),
                                                 options.dtype());
    t.unsafeGetTensorImpl()->set_sizes_and_strides(l.sizes, l.strides, l.offset);
  }
  t.unsafeGetTensorImpl()->set_python_dispatch(true);
  return wrap_as(t, S.vtensor);
}

// The layout `_make_wrapper_subclass`'s arguments describe; false for arguments of another form.
bool read_layout(PyObject* args, Layout& l) {
  if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 8) {
    return false;
  }
  PyObject* dtype = PyTuple_GET_ITEM(args, 5);
  PyObject* device = PyTuple_GET_ITEM(args, 7);
  if (!THPDtype_Check(dtype) || !THPDevice_Check(device)) {
    return false;
  }
  for (auto [i, out] : {std::pair{1, &l.sizes}, std::pair{2, &l.strides}}) {
    PyObject* seq = PyTuple_GET_ITEM(args, i);
    if (!PyTuple_Check(seq)) {  // torch.Size is a tuple
      return false;
    }
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(seq); j++) {
      out->push_back(PyLong_AsLongLong(PyTuple_GET_ITEM(seq, j)));
    }
  }
  l.offset = PyLong_AsLongLong(PyTuple_GET_ITEM(args, 3));
  if (PyErr_Occurred() || l.sizes.size() != l.strides.size()) {
    PyErr_Clear();
    return false;
  }
  l.dtype = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
  l.device = reinterpret_cast<THPDevice*>(device)->device;
  l.nbytes = at::detail::computeStorageNbytes(l.sizes, l.strides, c10::elementSize(l.dtype), l.offset);
  return true;
}

bool capturing() {
  PyObject* n = PyObject_GetAttr(S.clock, S.s_captures);
  if (n == nullptr) {
    throw python_error();
  }
  bool yes = PyObject_IsTrue(n);
  Py_DECREF(n);
  return yes;
}

// A new output's storage: (nbytes, allocator counts, None) are its arguments, its value known or not.
PyObject* make_storage(const Entry& e, bool known) {
  long long nbytes = PyLong_AsLongLong(PyTuple_GET_ITEM(e.storage_args, 0));
  if (nbytes == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  return new_storage(nbytes, PyTuple_GET_ITEM(e.storage_args, 1), known ? Py_True : Py_None);
}

// A cached op: the output made here, the launch accounted in Python. False: let Python do it (a value it
// computes otherwise, a graph being captured).
bool run(const c10::OperatorHandle& op, const Entry& e, torch::jit::Stack* stack, size_t nargs) {
  PyObject* storage = nullptr;
  PyObject* value = nullptr;  // a new reference, or null: no value
  std::optional<c10::InferenceMode> outside;
  if (e.storage_args == Py_None) {  // a view of the first argument: the same view of its value
    const at::Tensor& base = torch::jit::peek(*stack, 0, nargs).toTensor();
    if (base.is_cpu()) {
      return false;
    }
    PyObject* obj = python_object(base);
    if (is_set(obj, S.s_value)) {
      if (!e.values || !valued(base)) {
        return false;
      }
      value = compute(op, stack, nargs);
    }
    storage = PyObject_GetAttr(obj, S.s_vstorage);
    if (storage == nullptr) {
      Py_XDECREF(value);
      throw python_error();
    }
    if (c10::InferenceMode::is_enabled() && !base.is_inference()) {
      outside.emplace(false);  // a view of a tensor made outside inference mode is not an inference tensor
    }
  } else {
    bool known = false;
    if (e.values && all_valued(stack, nargs)) {  // a small output: its value, computed now
      if (capturing()) {
        return false;  // Python records it to be computed again at each replay
      }
      value = compute(op, stack, nargs);
      known = true;
    }
    storage = make_storage(e, known);  // may raise the virtual OutOfMemoryError
    if (storage == nullptr) {
      Py_XDECREF(value);
      throw python_error();
    }
  }
  PyObject* out = make_output(e);
  outside.reset();
  if (out == nullptr) {
    Py_DECREF(storage);
    Py_XDECREF(value);
    throw python_error();
  }
  try {
    set(out, S.s_d, e.meta);
    set(out, S.s_vstorage, storage);
    set(out, S.s_value, value != nullptr ? value : Py_None);
  } catch (...) {
    Py_DECREF(storage);
    Py_XDECREF(value);
    Py_DECREF(out);
    throw;
  }
  Py_DECREF(storage);
  PyObject* r = PyObject_CallOneArg(value != nullptr ? S.account_value : S.account, e.sig);
  Py_XDECREF(value);
  if (r == nullptr) {
    Py_DECREF(out);
    throw python_error();
  }
  Py_DECREF(r);
  at::Tensor t = THPVariable_Unpack(out);
  Py_DECREF(out);
  torch::jit::drop(*stack, nargs);
  torch::jit::push(*stack, std::move(t));
  return true;
}

void take_offer(std::string key, PyObject* func) {
  PyObject* o = S.offered;
  if (PyList_GET_SIZE(o) != 7 || PyList_GET_ITEM(o, 0) != func) {
    return;  // the op took another path (a value computed, an op of its own rules)
  }
  unsigned long ident = PyLong_AsUnsignedLong(PyList_GET_ITEM(o, 6));
  if (ident != PyThread_get_thread_ident()) {
    return;  // another thread's op, offered while this one was in Python
  }
  Entry e{PyList_GET_ITEM(o, 1), PyList_GET_ITEM(o, 2), PyList_GET_ITEM(o, 3), PyList_GET_ITEM(o, 4),
          PyList_GET_ITEM(o, 5) == Py_True, {}};
  if (kWrapsAs && !read_layout(e.wrap_args, e.layout)) {
    return;
  }
  if (S.cache.emplace(std::move(key), e).second) {  // else another thread filed it meanwhile
    Py_INCREF(e.sig);
    Py_INCREF(e.meta);
    Py_INCREF(e.wrap_args);
    Py_INCREF(e.storage_args);
  }
}

void hot(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  if (!S.on || c10::impl::TorchDispatchModeTLS::stack_len() > 0) {
    to_python(op, stack);
    return;
  }
  const auto& schema = op.schema();
  const size_t nargs = schema.arguments().size();
  pybind11::gil_scoped_acquire gil;
  std::string key;
  key.reserve(16 * nargs + 16);
  const void* id = &schema;
  key.append(reinterpret_cast<const char*>(&id), sizeof(id));
  for (const auto& v : torch::jit::last(*stack, nargs)) {
    if (!put_arg(key, v)) {
      to_python(op, stack);
      return;
    }
  }
  auto it = S.cache.find(key);
  if (it != S.cache.end()) {
    if (run(op, it->second, stack, nargs)) {
      S.hits++;
      return;
    }
    to_python(op, stack);
    return;
  }
  auto f = S.funcs.find(&schema);
  PyObject* func = f == S.funcs.end() ? nullptr : f->second;
  if (PyList_SetSlice(S.offered, 0, PY_SSIZE_T_MAX, nullptr) != 0) {
    throw python_error();
  }
  to_python(op, stack);
  if (func != nullptr && S.on) {
    take_offer(std::move(key), func);
  }
}

void clear() {
  for (auto& [key, e] : S.cache) {
    Py_DECREF(e.sig);
    Py_DECREF(e.meta);
    Py_DECREF(e.wrap_args);
    Py_DECREF(e.storage_args);
  }
  S.cache.clear();
}

void keep(PyObject*& slot, PyObject* value) {
  Py_XINCREF(value);
  Py_XDECREF(slot);
  slot = value;
}

}  // namespace

extern "C" {

// Route the registered ops here: vtensor (the class), make_wrapper, account(sig), account_value(sig), the
// clock, and the list Python's generic path fills with what it decided. New outputs' storages are the C
// `Storage` (`revati_memory_types`, which replayer.memory calls on import).
void revati_hot_enable(PyObject* vtensor, PyObject* make_wrapper, PyObject* account,
                       PyObject* account_value, PyObject* clock, PyObject* offered) {
  if (offered != S.offered) {
    clear();  // another emulator's signatures
  }
  keep(S.vtensor, vtensor);
  keep(S.make_wrapper, make_wrapper);
  keep(S.account, account);
  keep(S.account_value, account_value);
  keep(S.clock, clock);
  keep(S.offered, offered);
  if (S.s_d == nullptr) {
    S.s_d = PyUnicode_InternFromString("_d");
    S.s_n = PyUnicode_InternFromString("n");
    S.s_vstorage = PyUnicode_InternFromString("_vstorage");
    S.s_value = PyUnicode_InternFromString("_value");
    S.s_value_of_storage = PyUnicode_InternFromString("value");
    S.s_captures = PyUnicode_InternFromString("captures");
  }
  S.on = true;
}

// Everything to Python again. The cache stays for the same emulator's next activation.
void revati_hot_disable() { S.on = false; }

// Register `func` (an OpOverload, named "aten::name" and "overload") on the Python key: 1 done or already,
// 0 skipped (PyTorch has a Python-key kernel of its own for it), -1 no such op.
int revati_hot_register(const char* name, const char* overload, PyObject* func) {
  auto handle = c10::Dispatcher::singleton().findOp({name, overload});
  if (!handle.has_value()) {
    return -1;
  }
  const c10::FunctionSchema* schema = &handle->schema();
  if (S.funcs.count(schema)) {
    return 1;
  }
  if (handle->hasKernelForDispatchKey(c10::DispatchKey::Python)) {
    return 0;
  }
  if (!S.lib) {
    S.lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::Python,
                                             __FILE__, __LINE__);
  }
  std::string qualified = std::string(name).substr(std::strlen("aten::"));
  if (overload[0] != '\0') {
    qualified += std::string(".") + overload;
  }
  S.lib->impl(qualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&hot>());
  Py_INCREF(func);
  S.funcs[schema] = func;
  return 1;
}

long long revati_hot_hits() { return S.hits; }

// (Counts, Storage): the C twins of replayer/memory.py's classes, made once; null with an error set on failure.
PyObject* revati_memory_types() {
  if (CountsType == nullptr) {
    CountsType = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&counts_spec));
    if (CountsType == nullptr) {
      return nullptr;
    }
  }
  if (StorageType == nullptr) {
    StorageType = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&storage_spec));
    if (StorageType == nullptr) {
      return nullptr;
    }
  }
  return PyTuple_Pack(2, CountsType, StorageType);
}

// Whether outputs are made in C++ (1) or by calling `_make_wrapper_subclass` (0: a torch without
// `THPVariable_Wrap(tensor, type)`).
int revati_hot_wraps() { return kWrapsAs; }
}
