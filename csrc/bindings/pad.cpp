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
  // Keyword-only DeviceArrays (ops._device_array builds them from tensors): every size, dtype and
  // device is checked here against the offsets' n and the row length before the launch.
  m.def(
      "pad_cuda",
      [](const DeviceArray& values, const DeviceArray& offsets, const OptDeviceArray& label_values,
         const OptDeviceArray& label_offsets, const OptDeviceArray& out_ids,
         const OptDeviceArray& out_mask, const OptDeviceArray& out_labels,
         const OptDeviceArray& errors, int64_t length, int64_t max_tokens, bool pad_left,
         bool truncate_left, int64_t pad_value, int64_t label_pad_value, bool shift_labels,
         bool check_negative, uintptr_t stream) {
        constexpr const char* op = "pad_cuda";
        if (offsets.size < 1) throw py::value_error("pad_cuda: offsets needs n + 1 >= 1 entries");
        if (label_values.has_value() != label_offsets.has_value()) {
          throw py::value_error("pad_cuda: label_values and label_offsets go together");
        }
        const int dev = values.device;
        const int64_t n = offsets.size - 1;
        const int64_t size = pad_output_size(n, length);
        const PadOptions o{length,    max_tokens,      pad_left,    truncate_left,
                           pad_value, label_pad_value, shift_labels};
        const OptDeviceArray& first_out = out_ids ? out_ids : out_mask ? out_mask : out_labels;
        dispatch_int_dtype(values.dtype, "pad_cuda: values", [&](auto in) {
          dispatch_int_dtype(first_out ? first_out->dtype : "int64", "pad_cuda: outputs",
                             [&](auto out) {
            using In = decltype(in);
            using Out = decltype(out);
            const Ragged<In> ids{device_ptr<In>(values, -1, dev, op, "values"),
                                 device_ptr<int64_t>(offsets, n + 1, dev, op, "offsets"), n};
            const In* lv = device_ptr<In>(label_values, -1, dev, op, "label_values");
            const int64_t* lo = device_ptr<int64_t>(label_offsets, n + 1, dev, op, "label_offsets");
            auto* err = reinterpret_cast<unsigned long long*>(
                device_ptr<int64_t>(errors, 2 * kPadErrorSlots, dev, op, "errors"));
            pad_cuda<In, Out>(ids, values.size, lv, lo, label_values ? label_values->size : 0, o,
                              device_ptr<Out>(out_ids, size, dev, op, "out_ids"),
                              device_ptr<Out>(out_mask, size, dev, op, "out_mask"),
                              device_ptr<Out>(out_labels, size, dev, op, "out_labels"),
                              check_negative, err, reinterpret_cast<void*>(stream));
          });
        });
      },
      py::kw_only(), "values"_a, "offsets"_a, "label_values"_a = py::none(),
      "label_offsets"_a = py::none(), "out_ids"_a = py::none(), "out_mask"_a = py::none(),
      "out_labels"_a = py::none(), "errors"_a = py::none(), "length"_a, "max_tokens"_a = -1,
      "pad_left"_a = false, "truncate_left"_a = false, "pad_value"_a = 0,
      "label_pad_value"_a = -100, "shift_labels"_a = false, "check_negative"_a = true,
      "stream"_a, gil_release());
  m.attr("PAD_ERROR_SLOTS") = static_cast<int>(kPadErrorSlots);
#endif
}
}  // namespace mixtape
