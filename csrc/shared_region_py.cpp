// Python binding of the shared-region store (stratacache._C.SharedRegion).
//
// Thin: keys and metadata cross as bytes, handles as (slot, generation)
// integers, and the data area is exported through the buffer protocol so
// Python wraps it once with torch.frombuffer and copies with torch. Every call
// that may wait on the region lock releases the GIL first.
#include "shared_region_bindings.h"

#include "shared_region.h"
#include "torch_parallel.h"

namespace py = pybind11;

namespace stratacache {
namespace {

std::string_view view_of(const py::bytes& b) {
  char* p = nullptr;
  Py_ssize_t n = 0;
  if (PyBytes_AsStringAndSize(b.ptr(), &p, &n) != 0) throw py::error_already_set();
  return {p, size_t(n)};
}

// A namespace priority as stored in an entry (int32), or a ValueError naming it.
int32_t priority_arg(int64_t priority) {
  if (priority < INT32_MIN || priority > INT32_MAX)
    throw py::value_error("priority must fit in a signed 32-bit integer, got " + std::to_string(priority));
  return int32_t(priority);
}

py::object handle_tuple(const std::optional<ReadHandle>& h) {
  if (!h) return py::none();
  return py::make_tuple(h->slot, h->gen, h->offset, h->size, py::bytes(h->aux));
}

}  // namespace

void bind_shared_region(py::module_& m) {
  py::register_exception<RegionError>(m, "SharedRegionError", PyExc_RuntimeError);

  py::class_<SharedRegion>(m, "SharedRegion", py::buffer_protocol(),
                           "One mmap'ed object store shared by processes (see csrc/shared_region.h).")
      .def(py::init([](std::string path, uint64_t capacity, uint32_t max_objects, uint32_t max_key_bytes,
                       uint32_t block_bytes, int numa_node, uint32_t file_mode, bool reset, bool read_only) {
             RegionOptions o;
             o.path = std::move(path);
             o.capacity = capacity;
             o.max_objects = max_objects;
             o.max_key_bytes = max_key_bytes;
             o.block_bytes = block_bytes;
             o.numa_node = numa_node;
             o.file_mode = file_mode;
             o.reset = reset;
             o.read_only = read_only;
             py::gil_scoped_release nogil;
             return std::make_unique<SharedRegion>(o);
           }),
           py::kw_only(), py::arg("path"), py::arg("capacity") = 0, py::arg("max_objects") = 65536,
           py::arg("max_key_bytes") = 512, py::arg("block_bytes") = 4096, py::arg("numa_node") = -1,
           py::arg("file_mode") = 0600, py::arg("reset") = false, py::arg("read_only") = false)
      .def_buffer([](SharedRegion& r) {
        return py::buffer_info(r.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(r.data_bytes())}, {py::ssize_t(1)}, r.read_only());
      })
      .def_property_readonly("path", &SharedRegion::path)
      .def_property_readonly("data_bytes", &SharedRegion::data_bytes)
      .def_property_readonly("read_only", &SharedRegion::read_only)
      .def_property_readonly("mapping_address", [](SharedRegion& r) { return uintptr_t(r.mapping()); })
      .def_property_readonly("mapping_bytes", &SharedRegion::mapping_bytes)
      .def("put_tensor",
           [](SharedRegion& r, const py::bytes& key, const py::bytes& aux, const at::Tensor& src,
              bool evict, int64_t priority) -> py::object {
             TORCH_CHECK(src.device().is_cpu() && src.is_contiguous(), "put_tensor: src must be a contiguous CPU tensor");
             const int32_t prio = priority_arg(priority);
             auto k = view_of(key);
             auto a = view_of(aux);
             const auto* from = static_cast<const uint8_t*>(src.data_ptr());
             const uint64_t n = uint64_t(src.nbytes());
             std::optional<Reservation> res;
             bool ok = false;
             {
               py::gil_scoped_release nogil;
               res = r.reserve(k, n, a, evict, prio);
               if (res) {
                 parallel_copy(r.data() + res->offset, from, n, /*stream=*/true);   // not read back soon
                 ok = r.commit(*res);
               }
             }
             if (!res) return py::none();
             return py::bool_(ok);
           },
           py::arg("key"), py::arg("aux"), py::arg("src"), py::arg("evict") = true, py::arg("priority") = 0,
           "Reserve, copy src in (no lock held) and commit: True, False (commit lost), None (no room). "
           "The object records priority (its namespace kind's); eviction for it only takes objects "
           "of priority <= priority.")
      .def("get_into",
           [](SharedRegion& r, const py::bytes& key, double lease_s, const at::Tensor& out) -> py::object {
             TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kByte,
                         "get_into: out must be a contiguous CPU uint8 tensor");
             auto k = view_of(key);
             auto* to = static_cast<uint8_t*>(out.data_ptr());
             const uint64_t cap = uint64_t(out.numel());
             std::optional<ReadHandle> h;
             bool current = false;
             {
               py::gil_scoped_release nogil;
               h = r.acquire(k, lease_s);
               if (h && h->size <= cap) {
                 parallel_copy(to, r.data() + h->offset, h->size);
                 current = r.release(h->slot, h->gen);
               } else if (h) {
                 r.release(h->slot, h->gen);
               }
             }
             if (!h) return py::none();
             if (h->size > cap)
               throw py::value_error("out holds " + std::to_string(cap) + " bytes but the object has " +
                                     std::to_string(h->size));
             return py::make_tuple(h->slot, h->gen, h->size, py::bytes(h->aux), current);
           },
           py::arg("key"), py::arg("lease_s"), py::arg("out"),
           "Lease, copy into out (no lock held), release: (slot, gen, size, aux, still_current) or None.")
      .def("acquire",
           [](SharedRegion& r, const py::bytes& key, double lease_s, bool count_stats) {
             auto k = view_of(key);
             std::optional<ReadHandle> h;
             {
               py::gil_scoped_release nogil;
               h = r.acquire(k, lease_s, count_stats);
             }
             return handle_tuple(h);
           },
           py::arg("key"), py::arg("lease_s"), py::arg("count_stats") = true,
           "Lease the current version: (slot, gen, offset, size, aux) or None.")
      .def("release",
           [](SharedRegion& r, uint32_t slot, uint64_t gen) {
             py::gil_scoped_release nogil;
             return r.release(slot, gen);
           })
      .def("is_current", &SharedRegion::is_current)
      .def("contains",
           [](SharedRegion& r, const py::bytes& key) {
             auto k = view_of(key);
             py::gil_scoped_release nogil;
             return r.contains(k);
           })
      .def("contains_many",
           [](SharedRegion& r, const py::list& keys) {
             const size_t n = keys.size();
             std::vector<std::string_view> views(n);
             for (size_t i = 0; i < n; ++i) {
               PyObject* item = PyList_GET_ITEM(keys.ptr(), Py_ssize_t(i));
               char* p = nullptr;
               Py_ssize_t len = 0;
               if (!PyBytes_Check(item) || PyBytes_AsStringAndSize(item, &p, &len) != 0)
                 throw py::type_error("contains_many takes a list of bytes keys");
               views[i] = {p, size_t(len)};
             }
             std::vector<uint8_t> found(n);
             {
               py::gil_scoped_release nogil;
               r.contains_many(views.data(), n, found.data());
             }
             PyObject* out = PyList_New(Py_ssize_t(n));
             if (!out) throw py::error_already_set();
             for (size_t i = 0; i < n; ++i) {
               PyObject* v = found[i] ? Py_True : Py_False;
               Py_INCREF(v);
               PyList_SET_ITEM(out, Py_ssize_t(i), v);
             }
             return py::reinterpret_steal<py::list>(out);
           })
      .def("erase",
           [](SharedRegion& r, const py::bytes& key) {
             auto k = view_of(key);
             py::gil_scoped_release nogil;
             return r.erase(k);
           })
      .def("erase_version", &SharedRegion::erase_version, py::arg("slot"), py::arg("gen"),
           py::arg("evicted") = false, py::call_guard<py::gil_scoped_release>())
      .def("pick_victim",
           [](SharedRegion& r, double lease_s, int64_t priority) -> py::object {
             const int32_t prio = priority_arg(priority);
             std::optional<std::pair<std::string, ReadHandle>> v;
             {
               py::gil_scoped_release nogil;
               v = r.pick_victim(lease_s, prio);
             }
             if (!v) return py::none();
             return py::make_tuple(py::bytes(v->first), handle_tuple(v->second));
           },
           py::arg("lease_s"), py::arg("priority") = 0,
           "Lease the next CLOCK victim of priority <= priority (the incoming object's) without "
           "freeing it: (key, handle) or None.")
      .def("priority_of",
           [](SharedRegion& r, const py::bytes& key) -> py::object {
             auto k = view_of(key);
             std::optional<int32_t> p;
             {
               py::gil_scoped_release nogil;
               p = r.priority_of(k);
             }
             if (!p) return py::none();
             return py::int_(*p);
           },
           py::arg("key"), "The priority recorded with key's current version, or None on a miss.")
      .def("keys",
           [](SharedRegion& r) {
             std::vector<std::string> ks;
             {
               py::gil_scoped_release nogil;
               ks = r.keys();
             }
             py::list out;
             for (auto& k : ks) out.append(py::bytes(k));
             return out;
           })
      .def("clear", &SharedRegion::clear, py::call_guard<py::gil_scoped_release>())
      .def("reclaim", &SharedRegion::reclaim, py::call_guard<py::gil_scoped_release>())
      .def("check", &SharedRegion::check, py::call_guard<py::gil_scoped_release>())
      .def("prefault", &SharedRegion::prefault, py::arg("max_bytes"),
           py::call_guard<py::gil_scoped_release>(),
           "Maps committed objects' pages into this process (up to max_bytes of payload) so "
           "first reads take no page faults; returns the bytes populated.")
      .def("snapshot",
           [](SharedRegion& r) {
             std::vector<ObjectInfo> objs;
             {
               py::gil_scoped_release nogil;
               objs = r.snapshot();
             }
             py::list out;
             for (auto& o : objs) out.append(py::make_tuple(py::bytes(o.key), o.size, py::bytes(o.aux)));
             return out;
           },
           "Lock-free list of (key, size, aux) of committed objects; works read-only.")
      .def("stats",
           [](SharedRegion& r) {
             RegionStats s = r.stats();
             py::dict d;
             d["capacity"] = s.capacity;
             d["block_bytes"] = s.block_bytes;
             d["max_objects"] = s.max_objects;
             d["max_key_bytes"] = s.max_key_bytes;
             d["items"] = s.items;
             d["used_bytes"] = s.used_bytes;
             d["reserved_bytes"] = s.reserved_bytes;
             d["writing"] = s.writing;
             d["retired"] = s.retired;
             d["hits"] = s.hits;
             d["misses"] = s.misses;
             d["puts"] = s.puts;
             d["put_failures"] = s.put_failures;
             d["evictions"] = s.evictions;
             d["deletes"] = s.deletes;
             d["repairs"] = s.repairs;
             d["reclaimed_writers"] = s.reclaimed_writers;
             return d;
           })
      .def("lock_and_leak_for_testing", &SharedRegion::lock_and_leak_for_testing,
           py::call_guard<py::gil_scoped_release>(),
           "Test hook: take the region lock and never release it.");
}

}  // namespace stratacache
