// pack: the planner (rows of capacity C), the plan check and the fill (CPU and CUDA).
#include <limits>

#include "bindings/bindings.h"
#include "pack/pack.h"

namespace mixtape {
namespace {

template <typename T>
void bind_pack_plan_typed(py::module_& m) {
  m.def(
      "pack_plan",
      [](const Array<T>& lengths, int64_t capacity, const std::string& strategy,
         const std::string& overflow, int64_t max_docs_per_row, int64_t align,
         int64_t rows_multiple_of, std::optional<uint64_t> shuffle_seed) {
        if (lengths.ndim() != 1) {
          throw py::value_error("pack_plan: lengths must be 1-D, got ndim=" +
                                std::to_string(lengths.ndim()));
        }
        PackPlanOptions o;
        o.capacity = capacity;
        o.strategy = parse_pack_strategy(strategy);
        o.overflow = parse_pack_overflow(overflow);
        o.max_docs_per_row = max_docs_per_row;
        o.align = align;
        o.rows_multiple_of = rows_multiple_of;
        o.shuffle = shuffle_seed.has_value();
        o.shuffle_seed = shuffle_seed.value_or(0);
        PackPlanResult r;
        {
          py::gil_scoped_release nogil;
          pack_plan_cpu(lengths.data(), static_cast<int64_t>(lengths.size()), o, &r);
        }
        py::dict d;
        d["row_offsets"] = to_numpy(std::move(r.row_offsets));
        d["doc"] = to_numpy(std::move(r.doc));
        d["start"] = to_numpy(std::move(r.start));
        d["length"] = to_numpy(std::move(r.length));
        d["column"] = to_numpy(std::move(r.column));
        d["num_tokens"] = r.num_tokens;
        d["truncated_tokens"] = r.truncated_tokens;
        d["dropped_docs"] = r.dropped_docs;
        d["dropped_tokens"] = r.dropped_tokens;
        d["split_docs"] = r.split_docs;
        return d;
      },
      "lengths"_a.noconvert(), py::kw_only(), "capacity"_a, "strategy"_a = "bfd",
      "overflow"_a = "split", "max_docs_per_row"_a = 0, "align"_a = 1, "rows_multiple_of"_a = 1,
      "shuffle_seed"_a = py::none());
}

// The plan arrays as PackPieces (after checking their sizes agree).
PackPieces pack_pieces(const Array<int64_t>& row_offsets, const Array<int64_t>& doc,
                       const Array<int64_t>& start, const Array<int64_t>& length,
                       const Array<int64_t>& column) {
  const int64_t pieces = doc.size();
  if (row_offsets.ndim() != 1 || row_offsets.size() < 1 || start.size() != pieces ||
      length.size() != pieces || column.size() != pieces) {
    throw py::value_error("pack plan: row_offsets must have rows + 1 >= 1 entries and doc, "
                          "start, length, column the same size, got sizes " +
                          std::to_string(row_offsets.size()) + ", " + std::to_string(pieces) +
                          ", " + std::to_string(start.size()) + ", " +
                          std::to_string(length.size()) + ", " + std::to_string(column.size()));
  }
  return PackPieces{row_offsets.data(), doc.data(),    start.data(),          length.data(),
                    column.data(),      nullptr,       row_offsets.size() - 1, pieces};
}

PackFillOptions fill_options(int64_t capacity, bool flat, int64_t pad_value,
                             int64_t label_pad_value, int64_t position_start) {
  PackFillOptions o;
  o.capacity = capacity;
  o.flat = flat;
  o.pad_value = pad_value;
  o.label_pad_value = label_pad_value;
  o.position_start = position_start;
  return o;
}

template <typename In, typename Out>
void bind_pack_fill_typed(py::module_& m) {
  m.def(
      "pack_fill",
      [](const Array<In>& values, const Array<int64_t>& offsets, const Array<int64_t>& row_offsets,
         const Array<int64_t>& doc, const Array<int64_t>& start, const Array<int64_t>& length,
         const Array<int64_t>& column, int64_t capacity, bool flat, int64_t pad_value,
         int64_t label_pad_value, int64_t position_start, OptArray<Out> out_ids,
         OptArray<Out> out_labels, OptArray<int64_t> out_positions, OptArray<int32_t> out_seq_idx,
         OptArray<bool> out_loss_mask, bool elementwise) {
        const Ragged<In> docs = ragged(values, offsets, "pack_fill values");
        const PackPieces p = pack_pieces(row_offsets, doc, start, length, column);
        const PackFillOptions o =
            fill_options(capacity, flat, pad_value, label_pad_value, position_start);
        int64_t tokens;
        {
          py::gil_scoped_release nogil;
          tokens = check_pack_pieces(p, docs.offsets, docs.n, capacity);
        }
        const int64_t size = flat ? tokens : p.rows * capacity;
        auto ptr = [size](auto& a, const char* what) { return out_ptr(a, size, "pack_fill", what); };
        Out* ids = ptr(out_ids, "input_ids");
        Out* labels = ptr(out_labels, "labels");
        int64_t* positions = ptr(out_positions, "position_ids");
        int32_t* seq_idx = ptr(out_seq_idx, "seq_idx");
        bool* loss_mask = ptr(out_loss_mask, "loss_mask");
        py::gil_scoped_release nogil;
        return pack_fill_cpu<In, Out>(docs, p, o, ids, labels, positions, seq_idx, loss_mask,
                                      elementwise);
      },
      "values"_a.noconvert(), "offsets"_a.noconvert(), "row_offsets"_a.noconvert(),
      "doc"_a.noconvert(), "start"_a.noconvert(), "length"_a.noconvert(),
      "column"_a.noconvert(), py::kw_only(), "capacity"_a, "flat"_a = false, "pad_value"_a = 0,
      "label_pad_value"_a = -100, "position_start"_a = 0, "out_ids"_a.noconvert() = py::none(),
      "out_labels"_a.noconvert() = py::none(), "out_positions"_a.noconvert() = py::none(),
      "out_seq_idx"_a.noconvert() = py::none(), "out_loss_mask"_a.noconvert() = py::none(),
      "elementwise"_a = false);
}

template <typename In>
void bind_pack_rows_typed(py::module_& m) {
  m.def(
      "pack_rows",
      [](const Array<In>& values, const Array<int64_t>& lengths, const Array<int64_t>& row_offsets,
         const std::optional<Array<int64_t>>& piece_tag, int64_t capacity, int64_t pad_value,
         int64_t label_pad_value, int64_t position_start, int64_t tag_pad,
         OptArray<int64_t> out_ids, OptArray<int64_t> out_labels, OptArray<int64_t> out_positions,
         OptArray<int32_t> out_seq_idx, OptArray<int64_t> out_tags,
         OptArray<int32_t> out_cu_seqlens) {
        constexpr const char* op = "pack_rows";
        if (values.ndim() != 1 || lengths.ndim() != 1 || row_offsets.ndim() != 1 ||
            row_offsets.size() < 1) {
          throw py::value_error("pack_rows: values and lengths must be 1-D and row_offsets 1-D "
                                "with rows + 1 >= 1 entries");
        }
        const int64_t pieces = lengths.size(), rows = row_offsets.size() - 1;
        if (piece_tag && piece_tag->size() != pieces) {
          throw py::value_error("pack_rows: piece_tag has " + std::to_string(piece_tag->size()) +
                                " entries for " + std::to_string(pieces) + " pieces");
        }
        if (out_tags && !piece_tag) throw py::value_error("pack_rows: out_tags needs piece_tag");
        if (capacity < 0 || (capacity > 0 && rows > std::numeric_limits<int64_t>::max() / capacity)) {
          throw py::value_error("pack_rows: " + std::to_string(rows) + " rows of capacity " +
                                std::to_string(capacity) + " do not fit one int64 index");
        }
        const int64_t size = rows * capacity;
        int64_t* ids = out_ptr(out_ids, size, op, "input_ids");
        int64_t* labels = out_ptr(out_labels, size, op, "labels");
        int64_t* positions = out_ptr(out_positions, size, op, "position_ids");
        int32_t* seq_idx = out_ptr(out_seq_idx, size, op, "seq_idx");
        int64_t* tags = out_ptr(out_tags, size, op, "tags");
        int32_t* cu = out_ptr(out_cu_seqlens, 2 * pieces + rows + 1, op, "cu_seqlens");
        PackRowsOptions o;
        o.fill = fill_options(capacity, false, pad_value, label_pad_value, position_start);
        o.tag_pad = tag_pad;
        PackRowsResult r;
        {
          py::gil_scoped_release nogil;
          r = pack_rows_cpu<In>(values.data(), values.size(), lengths.data(), pieces,
                                row_offsets.data(), rows, piece_tag ? piece_tag->data() : nullptr,
                                o, ids, labels, positions, seq_idx, tags, cu);
        }
        return py::make_tuple(r.cu_size, r.max_segment, r.negative);
      },
      "values"_a.noconvert(), "lengths"_a.noconvert(), "row_offsets"_a.noconvert(),
      "piece_tag"_a.noconvert() = py::none(), py::kw_only(), "capacity"_a, "pad_value"_a = 0,
      "label_pad_value"_a = -100, "position_start"_a = 0, "tag_pad"_a = -1,
      "out_ids"_a.noconvert() = py::none(), "out_labels"_a.noconvert() = py::none(),
      "out_positions"_a.noconvert() = py::none(), "out_seq_idx"_a.noconvert() = py::none(),
      "out_tags"_a.noconvert() = py::none(), "out_cu_seqlens"_a.noconvert() = py::none());
}

}  // namespace

void bind_pack(py::module_& m) {
  bind_pack_rows_typed<int64_t>(m);
  bind_pack_rows_typed<int32_t>(m);
  bind_pack_plan_typed<int64_t>(m);
  bind_pack_plan_typed<int32_t>(m);
  m.def(
      "pack_check",
      [](const Array<int64_t>& offsets, const Array<int64_t>& row_offsets,
         const Array<int64_t>& doc, const Array<int64_t>& start, const Array<int64_t>& length,
         const Array<int64_t>& column, int64_t capacity) {
        if (offsets.ndim() != 1 || offsets.size() < 1) {
          throw py::value_error("pack_check: offsets must be 1-D with num_docs + 1 entries");
        }
        const PackPieces p = pack_pieces(row_offsets, doc, start, length, column);
        py::gil_scoped_release nogil;
        return check_pack_pieces(p, offsets.data(), offsets.size() - 1, capacity);
      },
      "offsets"_a.noconvert(), "row_offsets"_a.noconvert(), "doc"_a.noconvert(),
      "start"_a.noconvert(), "length"_a.noconvert(), "column"_a.noconvert(), py::kw_only(),
      "capacity"_a);
  bind_pack_fill_typed<int64_t, int64_t>(m);
  bind_pack_fill_typed<int32_t, int64_t>(m);
  bind_pack_fill_typed<int32_t, int32_t>(m);
  bind_pack_fill_typed<int64_t, int32_t>(m);
#ifdef MIXTAPE_WITH_CUDA
  // Keyword-only DeviceArrays (ops._device_array builds them from tensors); sizes, dtypes and
  // devices are checked here. The plan's contents were checked on the host (pack_check), which
  // also gave `tokens`, the flat layout's length.
  m.def(
      "pack_fill_cuda",
      [](const DeviceArray& values, const DeviceArray& offsets, const DeviceArray& row_offsets,
         const DeviceArray& doc, const DeviceArray& start, const DeviceArray& length,
         const DeviceArray& column, const OptDeviceArray& flat_offsets,
         const OptDeviceArray& out_ids, const OptDeviceArray& out_labels,
         const OptDeviceArray& out_positions, const OptDeviceArray& out_seq_idx,
         const OptDeviceArray& out_loss_mask, const OptDeviceArray& errors, int64_t capacity,
         int64_t tokens, bool flat, int64_t pad_value, int64_t label_pad_value,
         int64_t position_start, uintptr_t stream) {
        constexpr const char* op = "pack_fill_cuda";
        if (offsets.size < 1 || row_offsets.size < 1) {
          throw py::value_error("pack_fill_cuda: offsets and row_offsets need n + 1 >= 1 entries");
        }
        if (flat && !flat_offsets) {
          throw py::value_error("pack_fill_cuda: the flat layout needs flat_offsets");
        }
        const int dev = values.device;
        const int64_t num_docs = offsets.size - 1, rows = row_offsets.size - 1;
        const int64_t pieces = doc.size;
        if (capacity < 0 || tokens < 0 ||
            (capacity > 0 && rows > std::numeric_limits<int64_t>::max() / capacity)) {
          throw py::value_error("pack_fill_cuda: " + std::to_string(rows) + " rows of capacity " +
                                std::to_string(capacity) + " do not fit one int64 index");
        }
        const int64_t total = flat ? tokens : rows * capacity;
        const auto i64 = [&](const DeviceArray& a, int64_t size, const char* what) {
          return device_ptr<int64_t>(a, size, dev, op, what);
        };
        const PackPieces p{i64(row_offsets, rows + 1, "row_offsets"),
                           i64(doc, pieces, "doc"),
                           i64(start, pieces, "start"),
                           i64(length, pieces, "length"),
                           i64(column, pieces, "column"),
                           device_ptr<int64_t>(flat_offsets, pieces + 1, dev, op, "flat_offsets"),
                           rows,
                           pieces};
        const PackFillOptions o =
            fill_options(capacity, flat, pad_value, label_pad_value, position_start);
        const OptDeviceArray& first_out = out_ids ? out_ids : out_labels;
        dispatch_int_dtype(values.dtype, "pack_fill_cuda: values", [&](auto in) {
          dispatch_int_dtype(first_out ? first_out->dtype : "int64", "pack_fill_cuda: outputs",
                             [&](auto out) {
            using In = decltype(in);
            using Out = decltype(out);
            const Ragged<In> docs{device_ptr<In>(values, -1, dev, op, "values"),
                                  i64(offsets, num_docs + 1, "offsets"), num_docs};
            auto* err = reinterpret_cast<unsigned long long*>(
                device_ptr<int64_t>(errors, 2, dev, op, "errors"));
            pack_fill_cuda<In, Out>(
                docs, p, o, total, device_ptr<Out>(out_ids, total, dev, op, "out_ids"),
                device_ptr<Out>(out_labels, total, dev, op, "out_labels"),
                device_ptr<int64_t>(out_positions, total, dev, op, "out_positions"),
                device_ptr<int32_t>(out_seq_idx, total, dev, op, "out_seq_idx"),
                device_ptr<bool>(out_loss_mask, total, dev, op, "out_loss_mask"), err,
                reinterpret_cast<void*>(stream));
          });
        });
      },
      py::kw_only(), "values"_a, "offsets"_a, "row_offsets"_a, "doc"_a, "start"_a, "length"_a,
      "column"_a, "flat_offsets"_a = py::none(), "out_ids"_a = py::none(),
      "out_labels"_a = py::none(), "out_positions"_a = py::none(), "out_seq_idx"_a = py::none(),
      "out_loss_mask"_a = py::none(), "errors"_a = py::none(), "capacity"_a, "tokens"_a,
      "flat"_a = false, "pad_value"_a = 0, "label_pad_value"_a = -100, "position_start"_a = 0,
      "stream"_a, gil_release());
#endif
}
}  // namespace mixtape
