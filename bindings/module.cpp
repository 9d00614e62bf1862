#include "common.hpp"

#include "cvxq/dispatch.hpp"

namespace cvxq::py {

[[noreturn]] void shape_error(const std::string& msg) { throw ShapeError(msg); }

void expect_size(const char* name, size_t got, int64_t want) {
  if ((int64_t)got != want)
    shape_error(std::string(name) + ": expected " + std::to_string(want) + " elements, got " +
                std::to_string(got));
}

void expect_rows_cols(const char* name, size_t r, size_t c, int64_t want_r, int64_t want_c) {
  if ((int64_t)r != want_r || (int64_t)c != want_c)
    shape_error(std::string(name) + ": expected shape (" + std::to_string(want_r) + ", " +
                std::to_string(want_c) + "), got (" + std::to_string(r) + ", " +
                std::to_string(c) + ")");
}

void bind_common(nb::module_& m) {
  nb::class_<CancelFlag>(m, "CancelFlag",
                         "A flag the core polls between work units; set() stops the call, "
                         "which then raises Cancelled.")
      .def(nb::init<>())
      .def("set", &CancelFlag::set)
      .def("clear", &CancelFlag::clear)
      .def("is_set", &CancelFlag::is_set);

  m.def("cpu_has_avx2", &cpu_has_avx2, "True when the CPU supports AVX2 and FMA.");
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); },
        "Instruction set the kernels use now: 'avx2' or 'scalar'.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (name == "scalar") set_isa(Isa::Scalar);
        else if (name == "avx2") set_isa(Isa::AVX2);
        else throw ValueError("set_isa: expected 'scalar' or 'avx2', got '" + name + "'");
        return std::string(isa_name(active_isa()));
      },
      nb::arg("name"), "Force 'scalar' or 'avx2' (clamped to what the CPU has).");
  m.def("max_threads", &max_threads, "OpenMP threads the core uses.");
#ifdef CVXQ_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

}  // namespace cvxq::py

NB_MODULE(_core, m) {
  using namespace cvxq;
  m.doc() = "cvxq-tui compiled core: bit allocation, quantizers, packing, kernels";
  // Typed core errors become Python exceptions of matching kind.
  static nb::exception<ShapeError> shape_exc(m, "ShapeError", PyExc_ValueError);
  static nb::exception<InfeasibleError> infeasible_exc(m, "InfeasibleError", PyExc_ValueError);
  static nb::exception<FormatError> format_exc(m, "FormatError", PyExc_ValueError);
  static nb::exception<Cancelled> cancelled_exc(m, "Cancelled", PyExc_Exception);
  static nb::exception<ValueError> value_exc(m, "CoreValueError", PyExc_ValueError);
  py::bind_common(m);
  py::bind_allocate(m);
  py::bind_quantize(m);
  py::bind_packed(m);
  py::bind_cuda(m);
}
