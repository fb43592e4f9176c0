// sample: the source sampler's range kernel, its integer weights, and the row permutation.
#include "bindings/bindings.h"
#include "sample/sample.h"

namespace mixtape {
namespace {

GreedyPath parse_greedy_path(const std::string& name) {
  if (name == "auto") return GreedyPath::kAuto;
  if (name == "scalar") return GreedyPath::kScalar;
  if (name == "vector") return GreedyPath::kVector;
  if (name == "tree") return GreedyPath::kTree;
  throw py::value_error("greedy_path must be one of ('auto', 'scalar', 'vector', 'tree'), got '" +
                        name + "'");
}

int64_t check_1d(const py::array& a, const char* op, const char* what) {
  if (a.ndim() != 1) {
    throw py::value_error(std::string(op) + ": " + what + " must be 1-D, got ndim=" +
                          std::to_string(a.ndim()));
  }
  return static_cast<int64_t>(a.size());
}

}  // namespace

void bind_sample(py::module_& m) {
  m.def(
      "sample_sources",
      [](const Array<double>& weights, Array<int64_t>& counts, Array<int64_t>& segment_counts,
         const std::string& mode, uint64_t seed, int64_t block_size, bool shuffle,
         int64_t segment, int64_t segment_start, int64_t anchor, int64_t start, int64_t count,
         OptArray<int32_t>& out_sources, OptArray<int64_t>& out_ordinals,
         OptArray<int64_t>& end_counts, const std::string& greedy_path) {
        const int64_t s = check_1d(weights, "sample_sources", "weights");
        if (check_1d(counts, "sample_sources", "counts") != s ||
            check_1d(segment_counts, "sample_sources", "segment_counts") != s) {
          throw py::value_error("sample_sources: counts and segment_counts must have one entry "
                                "per source (" + std::to_string(s) + "), got " +
                                std::to_string(counts.size()) + " and " +
                                std::to_string(segment_counts.size()));
        }
        SampleOptions o;
        o.mode = parse_sample_mode(mode);
        o.seed = seed;
        o.block_size = block_size;
        o.shuffle = shuffle;
        o.segment = segment;
        o.segment_start = segment_start;
        o.greedy_path = parse_greedy_path(greedy_path);
        if (count < 0) {
          throw py::value_error("sample_sources: count must be >= 0, got " +
                                std::to_string(count));
        }
        int32_t* src = out_ptr(out_sources, count, "sample_sources", "sources");
        int64_t* ord = out_ptr(out_ordinals, count, "sample_sources", "ordinals");
        int64_t* ends = out_ptr(end_counts, s, "sample_sources", "end_counts");
        int64_t* c = counts.mutable_data();
        int64_t* sc = segment_counts.mutable_data();
        {
          py::gil_scoped_release nogil;
          sample_sources_cpu(weights.data(), s, o, &anchor, c, sc, start, count, src, ord, ends);
        }
        return anchor;
      },
      "weights"_a.noconvert(), "counts"_a.noconvert(), "segment_counts"_a.noconvert(),
      py::kw_only(), "mode"_a, "seed"_a, "block_size"_a, "shuffle"_a, "segment"_a,
      "segment_start"_a, "anchor"_a, "start"_a, "count"_a,
      "out_sources"_a.noconvert() = py::none(), "out_ordinals"_a.noconvert() = py::none(),
      "end_counts"_a.noconvert() = py::none(), "greedy_path"_a = "auto");
  m.def(
      "sample_weights",
      [](const Array<double>& weights) {
        const int64_t s = check_1d(weights, "sample_weights", "weights");
        std::vector<int64_t> w(static_cast<size_t>(s));
        const int64_t d = quantize_weights(weights.data(), s, w.data());
        return py::make_tuple(to_numpy(std::move(w)), d);
      },
      "weights"_a.noconvert());
  m.def(
      "block_counts",
      [](const Array<double>& weights, int64_t block_size) {
        const int64_t s = check_1d(weights, "block_counts", "weights");
        if (block_size < 1) {
          throw py::value_error("block_counts: block_size must be >= 1, got " +
                                std::to_string(block_size));
        }
        std::vector<int64_t> w(static_cast<size_t>(s)), n(static_cast<size_t>(s));
        const int64_t d = quantize_weights(weights.data(), s, w.data());
        block_counts(w.data(), s, d, block_size, n.data());
        return to_numpy(std::move(n));
      },
      "weights"_a.noconvert(), "block_size"_a);
  m.def(
      "permute_rows",
      [](const Array<int64_t>& ordinals, const Array<int64_t>& length,
         const Array<int64_t>& source, uint64_t seed, bool shuffle, Array<int64_t>& out) {
        const int64_t n = check_1d(ordinals, "permute_rows", "ordinals");
        const int64_t nl = check_1d(length, "permute_rows", "length");
        const int64_t ns = check_1d(source, "permute_rows", "source");
        if ((nl != 1 && nl != n) || (ns != 1 && ns != n) || nl < 1 || ns < 1) {
          throw py::value_error("permute_rows: length and source must have 1 or " +
                                std::to_string(n) + " entries, got " + std::to_string(nl) +
                                " and " + std::to_string(ns));
        }
        if (check_1d(out, "permute_rows", "out") != n) {
          throw py::value_error("permute_rows: out must have " + std::to_string(n) +
                                " entries, got " + std::to_string(out.size()));
        }
        const int64_t* len = length.data();
        const int64_t* src = source.data();
        int64_t* rows = out.mutable_data();
        py::gil_scoped_release nogil;
        permute_rows_cpu(ordinals.data(), n, len, nl == 1 ? 0 : 1, src, ns == 1 ? 0 : 1, seed,
                         shuffle, rows);
      },
      "ordinals"_a.noconvert(), "length"_a.noconvert(), "source"_a.noconvert(), py::kw_only(),
      "seed"_a, "shuffle"_a, "out"_a.noconvert());
}

}  // namespace mixtape
