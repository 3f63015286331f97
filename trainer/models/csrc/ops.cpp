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
std::vector<torch::Tensor> conv_bn_pool_relu_fwd(torch::Tensor x, torch::Tensor cw, c10::optional<torch::Tensor> cb, int64_t pad,
                                                  torch::Tensor bw, torch::Tensor bb, torch::Tensor running_mean,
                                                  torch::Tensor running_var, double momentum, double eps, bool out_bf16,
                                                  bool training);
std::vector<torch::Tensor> conv_bn_pool_relu_bwd(torch::Tensor gout, torch::Tensor code, torch::Tensor mean,
                                                  torch::Tensor invstd, torch::Tensor x, torch::Tensor cw,
                                                  c10::optional<torch::Tensor> cb, int64_t pad, torch::Tensor bw);
std::vector<torch::Tensor> bn_relu_cl_fwd(torch::Tensor x, torch::Tensor weight, torch::Tensor bias, torch::Tensor running_mean,
                                          torch::Tensor running_var, double momentum, double eps, bool training);
std::vector<torch::Tensor> bn_relu_cl_bwd(torch::Tensor dy, torch::Tensor y, torch::Tensor x, torch::Tensor weight,
                                          torch::Tensor mean, torch::Tensor invstd);
std::vector<torch::Tensor> add_maxpool_cl_fwd(torch::Tensor a, torch::Tensor b);
torch::Tensor add_maxpool_cl_bwd(torch::Tensor gout, torch::Tensor code, std::vector<int64_t> size);
std::vector<torch::Tensor> global_pool_cl_fwd(torch::Tensor x);
torch::Tensor global_pool_cl_bwd(torch::Tensor gout, torch::Tensor arg, std::vector<int64_t> size);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bn_maxpool_relu_forward", &bn_pool_relu_fwd,
        "(x, weight, bias, running_mean, running_var, momentum, eps) -> (out, argmax, x_at_max, mean, invstd)");
  m.def("bn_maxpool_relu_backward", &bn_pool_relu_bwd,
        "(grad_out, out, argmax, x_at_max, x, weight, mean, invstd) -> (dx, dweight, dbias)");
  m.def("bn_relu_channels_last_forward", &bn_relu_cl_fwd,
        "(x, weight, bias, running_mean, running_var, momentum, eps, training) -> (y, mean, invstd)");
  m.def("bn_relu_channels_last_backward", &bn_relu_cl_bwd, "(grad_y, y, x, weight, mean, invstd) -> (dx, dweight, dbias)");
  m.def("add_maxpool_channels_last_forward", &add_maxpool_cl_fwd, "(a, b) -> (maxpool2x2(a + b), code)");
  m.def("add_maxpool_channels_last_backward", &add_maxpool_cl_bwd, "(grad_out, code, input_size) -> grad of a and b");
  m.def("global_pool_channels_last_forward", &global_pool_cl_fwd, "x -> (cat(global max, global mean), argmax)");
  m.def("global_pool_channels_last_backward", &global_pool_cl_bwd, "(grad_out, argmax, input_size) -> grad of x");
  m.def("conv_small_cin_forward", &conv_first_fwd, "(x, weight, bias or None, padding) -> y");
  m.def("conv_bn_pool_relu_forward", &conv_bn_pool_relu_fwd,
        "(x, conv_weight, conv_bias or None, padding, bn_weight, bn_bias, running_mean, running_var, momentum, eps, "
        "bf16_out, training) -> (out channels-last, code, mean, invstd)");
  m.def("conv_bn_pool_relu_backward", &conv_bn_pool_relu_bwd,
        "(grad_out, code, mean, invstd, x, conv_weight, conv_bias or None, padding, bn_weight) "
        "-> (d conv_weight, d conv_bias, d bn_weight, d bn_bias)");
  m.def("conv_small_cin_weight_grad", &conv_first_wgrad, "(grad_y, x, kernel_size, padding, with_bias) -> (dweight, dbias)");
}
