// pad: ragged -> dense [n, L] ids, attention mask and labels (CPU and CUDA entry points).
#include "bindings/bindings.h"
#include "pad/pad.h"

namespace mixtape {
namespace {

template <typename In, typename Out>
void bind_pad_typed(py::module_& m) {
  m.def(
      "pad",
      [](const Array<In>& values, const Array<int64_t>& offsets, const OptArray<In>& label_values,
         const std::optional<Array<int64_t>>& label_offsets, int64_t length, int64_t max_tokens,
         bool pad_left, bool truncate_left, int64_t pad_value, int64_t label_pad_value, bool shift_labels,
         OptArray<Out>& out_ids, OptArray<Out>& out_mask, OptArray<Out>& out_labels,
         bool check_negative, bool elementwise) {
        // Python objects only by reference: the call_guard releases the GIL around this whole
        // call, so a by-value py::array parameter would be Py_DECREF'd without the GIL.
        const Ragged<In> ids = ragged(values, offsets, "input_ids");
        const In* lv = nullptr;
        const int64_t* lo = nullptr;
        if (label_values) {
          if (!label_offsets) throw py::value_error("pad: label_values needs label_offsets");
          const Ragged<In> lab = ragged(*label_values, *label_offsets, "labels");
          if (lab.n != ids.n) {
            throw py::value_error("pad: " + std::to_string(lab.n) + " label rows for " +
                                  std::to_string(ids.n) + " input_ids rows");
          }
          lv = lab.values;
          lo = lab.offsets;
        }
        PadOptions o;
        o.length = length;
        o.max_tokens = max_tokens;
        o.pad_left = pad_left;
        o.truncate_left = truncate_left;
        o.pad_value = pad_value;
        o.label_pad_value = label_pad_value;
        o.shift_labels = shift_labels;
        const int64_t size = pad_output_size(ids.n, length);
        return pad_cpu_impl<In, Out>(ids, lv, lo, o, out_ptr(out_ids, size, "pad", "input_ids"),
                                     out_ptr(out_mask, size, "pad", "attention_mask"),
                                     out_ptr(out_labels, size, "pad", "labels"), check_negative,
                                     elementwise);
      },
      "values"_a.noconvert(), "offsets"_a.noconvert(), "label_values"_a.noconvert() = py::none(),
      "label_offsets"_a.noconvert() = py::none(), py::kw_only(), "length"_a, "max_tokens"_a = -1,
      "pad_left"_a = false,
      "truncate_left"_a = false, "pad_value"_a = 0, "label_pad_value"_a = -100,
      "shift_labels"_a = false, "out_ids"_a.noconvert() = py::none(),
      "out_mask"_a.noconvert() = py::none(), "out_labels"_a.noconvert() = py::none(),
      "check_negative"_a = true, "elementwise"_a = false, gil_release());
}

}  // namespace

void bind_pad(py::module_& m) {
  bind_pad_typed<int64_t, int64_t>(m);
  bind_pad_typed<int32_t, int64_t>(m);
  bind_pad_typed<int32_t, int32_t>(m);
  bind_pad_typed<int64_t, int32_t>(m);
#ifdef MIXTAPE_WITH_CUDA
  m.def(
      "pad_cuda",
      [](uintptr_t values, uintptr_t offsets, int64_t n, uintptr_t label_values,
         uintptr_t label_offsets, int in_bits, int out_bits, int64_t length, int64_t max_tokens,
         bool pad_left, bool truncate_left, int64_t pad_value, int64_t label_pad_value, bool shift_labels,
         uintptr_t out_ids, uintptr_t out_mask, uintptr_t out_labels, uintptr_t stream) {
        PadOptions o{length,    max_tokens,      pad_left,    truncate_left,
                     pad_value, label_pad_value, shift_labels};
        dispatch_int_bits(in_bits, "in_bits", [&](auto in) {
          dispatch_int_bits(out_bits, "out_bits", [&](auto out) {
            using In = decltype(in);
            using Out = decltype(out);
            pad_cuda<In, Out>(
                Ragged<In>{reinterpret_cast<const In*>(values),
                           reinterpret_cast<const int64_t*>(offsets), n},
                reinterpret_cast<const In*>(label_values),
                reinterpret_cast<const int64_t*>(label_offsets), o,
                reinterpret_cast<Out*>(out_ids), reinterpret_cast<Out*>(out_mask),
                reinterpret_cast<Out*>(out_labels), reinterpret_cast<void*>(stream));
          });
        });
      },
      "values"_a, "offsets"_a, "n"_a, "label_values"_a, "label_offsets"_a, "in_bits"_a,
      "out_bits"_a, "length"_a, "max_tokens"_a, "pad_left"_a, "truncate_left"_a, "pad_value"_a,
      "label_pad_value"_a, "shift_labels"_a, "out_ids"_a, "out_mask"_a, "out_labels"_a,
      "stream"_a, gil_release());
#endif
}
}  // namespace mixtape
