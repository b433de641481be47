// The one binding file of segkd's C++ kernels: the `segkd_cpp` operator namespace, its CPU implementations and,
// when built with CUDA (SEGKD_WITH_CUDA, set by kernels/_cpp.py when nvcc and a CUDA torch are present), its CUDA
// ones. Loaded into the process as a plain library (no Python module): the ops are torch.ops.segkd_cpp.<name>.
// Autograd and torch.compile go through kernels/<op>.py's torch.library custom ops, which call these.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(segkd_cpp, m) {
  m.def("pixel_kl(Tensor s, Tensor t, Tensor? valid, Tensor nvalid, Tensor? wscale, Tensor(a!) kl, Tensor(b!) g, "
        "float temperature, bool write_grad, int block) -> ()");
  m.def("channel_kl(Tensor s, Tensor t, Tensor(a!) kl, Tensor(b!) g, float temperature, float scale, "
        "bool write_grad) -> ()");
  m.def("angular_stats(Tensor s, Tensor t, int mode, int chunk, Tensor(a!) out) -> ()");
  m.def("angular_apply(Tensor s, Tensor t, Tensor k, int mode, Tensor(a!) g) -> ()");
  m.def("bn_stat(Tensor x, int chunk, Tensor(a!) out) -> ()");
  m.def("bn_stat_apply(Tensor x, Tensor k, Tensor(a!) g) -> ()");
  m.def("class_sums(Tensor f, Tensor y, int K, int ignore_index, Tensor? a, Tensor? e, Tensor(a!) sums, "
        "Tensor(b!) counts) -> ()");
  m.def("class_gather(Tensor y, Tensor gp, int ignore_index, Tensor(a!) g) -> ()");
  m.def("upsampled_ce(Tensor x, Tensor y, int ignore_index, Tensor(a!) loss, Tensor(b!) count, int block) -> ()");
  m.def("upsampled_ce_backward(Tensor x, Tensor y, Tensor scale, int ignore_index, Tensor(a!) g) -> ()");
  m.def("gram(Tensor x, Tensor rx, Tensor y, Tensor ry, Tensor(a!) g) -> ()");
  m.def("gram_apply(Tensor g1, Tensor x1, Tensor r1, Tensor g2, Tensor x2, Tensor r2, Tensor(a!) df, "
        "Tensor(b!) proj) -> ()");
  m.def("unnormalise(Tensor x, Tensor r, Tensor df, Tensor proj, Tensor scale, Tensor(a!) dx) -> ()");
  m.def("scale_grad_(Tensor(a!) g, Tensor grad_output) -> ()");
}

TORCH_LIBRARY_IMPL(segkd_cpp, CPU, m) {
  m.impl("pixel_kl", &segkd::pixel_kl_cpu);
  m.impl("channel_kl", &segkd::channel_kl_cpu);
  m.impl("angular_stats", &segkd::angular_stats_cpu);
  m.impl("angular_apply", &segkd::angular_apply_cpu);
  m.impl("bn_stat", &segkd::bn_stat_cpu);
  m.impl("bn_stat_apply", &segkd::bn_stat_apply_cpu);
  m.impl("class_sums", &segkd::class_sums_cpu);
  m.impl("class_gather", &segkd::class_gather_cpu);
  m.impl("upsampled_ce", &segkd::upsampled_ce_cpu);
  m.impl("upsampled_ce_backward", &segkd::upsampled_ce_backward_cpu);
  m.impl("gram", &segkd::gram_cpu);
  m.impl("gram_apply", &segkd::gram_apply_cpu);
  m.impl("unnormalise", &segkd::unnormalise_cpu);
  m.impl("scale_grad_", &segkd::scale_grad_cpu);
}

#ifdef SEGKD_WITH_CUDA
TORCH_LIBRARY_IMPL(segkd_cpp, CUDA, m) {
  m.impl("pixel_kl", &segkd::pixel_kl_cuda);
  m.impl("channel_kl", &segkd::channel_kl_cuda);
  m.impl("angular_stats", &segkd::angular_stats_cuda);
  m.impl("angular_apply", &segkd::angular_apply_cuda);
  m.impl("bn_stat", &segkd::bn_stat_cuda);
  m.impl("bn_stat_apply", &segkd::bn_stat_apply_cuda);
  m.impl("class_sums", &segkd::class_sums_cuda);
  m.impl("class_gather", &segkd::class_gather_cuda);
  m.impl("upsampled_ce", &segkd::upsampled_ce_cuda);
  m.impl("upsampled_ce_backward", &segkd::upsampled_ce_backward_cuda);
  m.impl("gram", &segkd::gram_cuda);
  m.impl("gram_apply", &segkd::gram_apply_cuda);
  m.impl("unnormalise", &segkd::unnormalise_cuda);
  m.impl("scale_grad_", &segkd::scale_grad_cuda);
}
#endif
