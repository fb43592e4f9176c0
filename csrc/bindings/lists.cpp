// lists: Python lists of ints -> ragged int64, read by one C++ loop over the list items.
#include "bindings/bindings.h"

namespace mixtape {
namespace {

// Python lists of Python ints -> ragged int64 (values, offsets): the boundary where users hand us
// tokenizer output. It reads Python objects, so it holds the GIL (the one binding that does); a
// direct loop over the list items is ~4x faster than array.array.fromlist per row.
py::tuple ints_from_lists(const py::list& rows, const std::string& name, int64_t first) {
  const Py_ssize_t n = PyList_GET_SIZE(rows.ptr());
  Array<int64_t> offsets(n + 1);
  int64_t* off = offsets.mutable_data();
  off[0] = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* row = PyList_GET_ITEM(rows.ptr(), i);
    if (!PyList_Check(row)) {
      throw py::type_error(name + ": example " + std::to_string(first + i) + " must be a list, got " +
                           Py_TYPE(row)->tp_name);
    }
    off[i + 1] = off[i] + PyList_GET_SIZE(row);
  }
  Array<int64_t> values(off[n]);
  int64_t* out = values.mutable_data();
  // __index__ of a non-int item runs Python code, which may resize, clear or replace the outer list
  // or any row: every object read is held by a strong reference (a borrowed one could be freed by
  // that code while in use), and after each such call the shapes are checked again.
  const auto changed = [&]() {
    return py::value_error(name + ": the list of examples changed while it was read (an item's "
                           "__index__ modified it)");
  };
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyList_GET_SIZE(rows.ptr()) != n) throw changed();
    const py::object row = py::reinterpret_borrow<py::object>(PyList_GET_ITEM(rows.ptr(), i));
    const Py_ssize_t len = off[i + 1] - off[i];
    const auto check_row = [&]() {
      if (PyList_GET_SIZE(rows.ptr()) != n || PyList_GET_ITEM(rows.ptr(), i) != row.ptr()) {
        throw changed();
      }
      if (!PyList_Check(row.ptr()) || PyList_GET_SIZE(row.ptr()) != len) {
        throw py::value_error(name + ": example " + std::to_string(first + i) +
                              " changed size while it was read");
      }
    };
    check_row();
    for (Py_ssize_t j = 0; j < len; ++j) {
      // Borrowed while no Python code runs (the int fast path); held before __index__ runs.
      PyObject* item = PyList_GET_ITEM(row.ptr(), j);
      int overflow = 0;
      long long v;
      if (PyLong_Check(item)) {
        v = PyLong_AsLongLongAndOverflow(item, &overflow);
      } else {
        const py::object held = py::reinterpret_borrow<py::object>(item);
        py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(item));
        if (!index) {
          PyErr_Clear();
          throw py::type_error(name + ": example " + std::to_string(first + i) +
                               " has a non-integer token id at position " + std::to_string(j) +
                               ": " + py::repr(held).cast<std::string>() + " (" +
                               Py_TYPE(item)->tp_name + ")");
        }
        check_row();
        v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
        if (overflow != 0) {
          throw py::value_error(name + ": example " + std::to_string(first + i) +
                                " has a token id out of the int64 range at position " +
                                std::to_string(j) + ": " + py::str(index).cast<std::string>());
        }
      }
      if (overflow != 0) {
        throw py::value_error(name + ": example " + std::to_string(first + i) +
                              " has a token id out of the int64 range at position " +
                              std::to_string(j) + ": " + py::str(item).cast<std::string>());
      }
      out[off[i] + j] = v;
    }
  }
  return py::make_tuple(std::move(values), std::move(offsets));
}

}  // namespace

void bind_lists(py::module_& m) {
  m.def("ints_from_lists", &ints_from_lists, "rows"_a, "name"_a = "input_ids", "first"_a = 0);
}
}  // namespace mixtape
