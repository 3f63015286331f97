// Python bindings of the trainer's CPU kernels (trainer/models/_fused.py builds and loads them).
#include <torch/extension.h>
#include <vector>

std::vector<torch::Tensor> bn_pool_relu_fwd(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                                             torch::Tensor running_mean, torch::Tensor running_var,
                                             double momentum, double eps);
std::vector<torch::Tensor> bn_pool_relu_bwd(torch::Tensor gout, torch::Tensor out, torch::Tensor idx,
                                             torch::Tensor xmax, torch::Tensor x, torch::Tensor weight, torch::Tensor mean,
                                             torch::Tensor invstd);
torch::Tensor conv_first_fwd(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, int64_t pad);
std::vector<torch::Tensor> conv_first_wgrad(torch::Tensor dy, torch::Tensor x, int64_t K, int64_t pad, bool with_bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bn_maxpool_relu_forward", &bn_pool_relu_fwd,
        "(x, weight, bias, running_mean, running_var, momentum, eps) -> (out, argmax, x_at_max, mean, invstd)");
  m.def("bn_maxpool_relu_backward", &bn_pool_relu_bwd,
        "(grad_out, out, argmax, x_at_max, x, weight, mean, invstd) -> (dx, dweight, dbias)");
  m.def("conv_small_cin_forward", &conv_first_fwd, "(x, weight, bias or None, padding) -> y");
  m.def("conv_small_cin_weight_grad", &conv_first_wgrad, "(grad_y, x, kernel_size, padding, with_bias) -> (dweight, dbias)");
}
