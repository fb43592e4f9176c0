// datainf: influence scores of training samples on a probe set (CPU and CUDA entry points), and
// the projection matrix (for tests and the CUDA path's tiles).
#include "bindings/bindings.h"
#include "datainf/datainf.h"

namespace mixtape {
namespace {

// One layer's gradient matrix: a 2-D float32 or uint16 (bfloat16 bits) array with contiguous rows
// (any row stride >= d, so a column slice of a wider buffer needs no copy).
DataInfLayer host_layer(const py::array& g, const Array<float>& v, int64_t l, int64_t n) {
  const auto where = "datainf: layer " + std::to_string(l);
  if (g.ndim() != 2) {
    throw py::value_error(where + ": gradients must be 2-D [n, d], got ndim=" +
                          std::to_string(g.ndim()));
  }
  DataInfLayer L;
  if (g.dtype().equal(py::dtype::of<float>())) {
    L.dtype = GradDtype::kFloat32;
  } else if (g.dtype().equal(py::dtype::of<uint16_t>())) {
    L.dtype = GradDtype::kBFloat16;
  } else {
    throw py::type_error(where + ": gradients must be float32 or uint16 (bfloat16 bits), got " +
                         py::str(g.dtype()).cast<std::string>());
  }
  const int64_t rows = g.shape(0), d = g.shape(1), item = g.itemsize();
  if (rows != n) {
    throw py::value_error(where + ": " + std::to_string(rows) + " rows, layer 0 has " +
                          std::to_string(n));
  }
  if (v.ndim() != 1 || v.shape(0) != d) {
    throw py::value_error(where + ": probe gradient has " + std::to_string(v.size()) +
                          " entries, the layer has d = " + std::to_string(d));
  }
  const int64_t s0 = g.strides(0), s1 = g.strides(1);
  if (d > 1 && s1 != item) {
    throw py::value_error(where + ": rows must be contiguous (inner stride " + std::to_string(s1) +
                          " bytes)");
  }
  int64_t stride = d;
  if (rows > 1) {
    if (s0 < d * item || s0 % item != 0) {
      throw py::value_error(where + ": row stride of " + std::to_string(s0) +
                            " bytes is not a whole number of rows of d elements or more");
    }
    stride = s0 / item;
  }
  L.grads = g.data();
  L.d = d;
  L.stride = stride;
  L.probe = v.data();
  return L;
}

py::tuple datainf_host(const std::vector<py::array>& grads, const std::vector<Array<float>>& probes,
                       const Array<uint64_t>& keys, const Array<double>& lambdas, double damping,
                       int64_t projection_dim, uint64_t seed, bool stats_only,
                       OptArray<float>& out_influence, OptArray<float>& out_per_layer,
                       OptArray<float>& out_a, OptArray<float>& out_q,
                       OptArray<double>& out_lambdas, OptArray<double>& out_probe_sq,
                       int cpu_isa, bool elementwise) {
  const int64_t L = static_cast<int64_t>(grads.size());
  if (L == 0) throw py::value_error("datainf: no layers");
  if (static_cast<int64_t>(probes.size()) != L || keys.size() != L || lambdas.size() != L) {
    throw py::value_error("datainf: " + std::to_string(L) + " gradient layers but " +
                          std::to_string(probes.size()) + " probes, " +
                          std::to_string(keys.size()) + " keys, " +
                          std::to_string(lambdas.size()) + " lambdas");
  }
  const int64_t n = grads[0].ndim() == 2 ? grads[0].shape(0) : 0;
  std::vector<DataInfLayer> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    layers[l] = host_layer(grads[l], probes[l], l, n);
    layers[l].key = keys.data()[l];
    layers[l].lambda = lambdas.data()[l];
  }
  DataInfOptions o;
  o.damping = damping;
  o.projection_dim = projection_dim;
  o.seed = seed;
  o.stats_only = stats_only;
  o.cpu_isa = cpu_isa;
  DataInfOutputs out;
  out.influence = out_ptr(out_influence, n, "datainf", "influence");
  out.per_layer = out_ptr(out_per_layer, L * n, "datainf", "per_layer");
  out.a = out_ptr(out_a, L * n, "datainf", "a");
  out.q = out_ptr(out_q, L * n, "datainf", "q");
  out.lambdas = out_ptr(out_lambdas, L, "datainf", "lambdas");
  out.probe_sq = out_ptr(out_probe_sq, L, "datainf", "probe_sq");
  DataInfStatus st;
  {
    py::gil_scoped_release nogil;
    st = datainf_cpu(layers.data(), L, n, o, out, elementwise);
  }
  return py::make_tuple(st.layer, st.sample);
}

}  // namespace

void bind_datainf(py::module_& m) {
  // Python objects only by reference: the GIL is released inside, after validation.
  m.def("datainf", &datainf_host, "grads"_a.noconvert(), "probes"_a.noconvert(),
        "keys"_a.noconvert(), "lambdas"_a.noconvert(), py::kw_only(), "damping"_a = 0.1,
        "projection_dim"_a = 0, "seed"_a = 0, "stats_only"_a = false,
        "out_influence"_a.noconvert() = py::none(), "out_per_layer"_a.noconvert() = py::none(),
        "out_a"_a.noconvert() = py::none(), "out_q"_a.noconvert() = py::none(),
        "out_lambdas"_a.noconvert() = py::none(),
        "out_probe_sq"_a.noconvert() = py::none(), "cpu_isa"_a = -1, "elementwise"_a = false);
  m.def(
      "projection_matrix",
      [](uint64_t seed, uint64_t layer_key, int64_t k, int64_t d, int64_t col_begin,
         int64_t cols) {
        if (cols < 0) cols = d - col_begin;
        if (k < 1 || d < 1 || col_begin < 0 || cols < 0 || col_begin + cols > d) {
          throw py::value_error("projection_matrix: need k, d >= 1 and 0 <= col_begin <= "
                                "col_begin + cols <= d, got k=" + std::to_string(k) + ", d=" +
                                std::to_string(d) + ", col_begin=" + std::to_string(col_begin) +
                                ", cols=" + std::to_string(cols));
        }
        Array<float> out({k, cols});
        float* p = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          projection_matrix_cpu(seed, layer_key, k, d, col_begin, cols, p);
        }
        return out;
      },
      "seed"_a, "layer_key"_a, "k"_a, "d"_a, "col_begin"_a = 0, "cols"_a = -1);
#ifdef MIXTAPE_WITH_CUDA
  m.def(
      "datainf_cuda",
      [](const std::vector<uintptr_t>& grads, const std::vector<int>& dtypes,
         const std::vector<int64_t>& dims, const std::vector<int64_t>& strides,
         const std::vector<uintptr_t>& probes, const std::vector<double>& lambdas, int64_t n,
         double damping, bool stats_only, uintptr_t influence, uintptr_t per_layer, uintptr_t a,
         uintptr_t q, uintptr_t lambdas_out, uintptr_t b, uintptr_t u, uintptr_t u_partial,
         uintptr_t bad, uintptr_t stream) {
        const size_t L = grads.size();
        if (dtypes.size() != L || dims.size() != L || strides.size() != L ||
            probes.size() != L || lambdas.size() != L) {
          throw py::value_error("datainf_cuda: per-layer lists differ in length");
        }
        std::vector<DataInfLayer> layers(L);
        for (size_t l = 0; l < L; ++l) {
          layers[l].grads = reinterpret_cast<const void*>(grads[l]);
          if (dtypes[l] != 0 && dtypes[l] != 1) {
            throw py::value_error("datainf_cuda: dtype code must be 0 (float32) or 1 (bfloat16)");
          }
          layers[l].dtype = dtypes[l] == 1 ? GradDtype::kBFloat16 : GradDtype::kFloat32;
          layers[l].d = dims[l];
          layers[l].stride = strides[l];
          layers[l].probe = reinterpret_cast<const float*>(probes[l]);
          layers[l].lambda = lambdas[l];
        }
        DataInfOptions o;
        o.damping = damping;
        o.stats_only = stats_only;
        DataInfOutputs out;
        out.influence = reinterpret_cast<float*>(influence);
        out.per_layer = reinterpret_cast<float*>(per_layer);
        out.a = reinterpret_cast<float*>(a);
        out.q = reinterpret_cast<float*>(q);
        out.lambdas = reinterpret_cast<double*>(lambdas_out);
        DataInfCudaWorkspace ws;
        ws.b = reinterpret_cast<float*>(b);
        ws.u = reinterpret_cast<float*>(u);
        ws.u_partial = reinterpret_cast<float*>(u_partial);
        ws.bad = reinterpret_cast<int64_t*>(bad);
        py::gil_scoped_release nogil;
        datainf_cuda(layers.data(), static_cast<int64_t>(L), n, o, out, ws,
                     reinterpret_cast<void*>(stream));
      },
      "grads"_a, "dtypes"_a, "dims"_a, "strides"_a, "probes"_a, "lambdas"_a, py::kw_only(),
      "n"_a, "damping"_a, "stats_only"_a, "influence"_a, "per_layer"_a, "a"_a, "q"_a,
      "lambdas_out"_a, "b"_a, "u"_a, "u_partial"_a, "bad"_a, "stream"_a);
  m.def(
      "projection_matrix_cuda",
      [](uintptr_t out, uint64_t seed, uint64_t layer_key, int64_t k, int64_t d,
         int64_t col_begin, int64_t cols, uintptr_t stream) {
        projection_matrix_cuda(seed, layer_key, k, d, col_begin, cols,
                               reinterpret_cast<float*>(out), reinterpret_cast<void*>(stream));
      },
      "out"_a, "seed"_a, "layer_key"_a, "k"_a, "d"_a, "col_begin"_a, "cols"_a, "stream"_a,
      gil_release());
#endif
}

}  // namespace mixtape
