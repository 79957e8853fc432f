// Weight gradient of a depth-wise conv (stride 1) on channels-last maps.
//
// oneDNN computes it with its generic grouped kernel for any kernel but 3x3: 10-15x slower than its
// forward or input gradient at 5x5 and 7x7 (results/benchmarks.md, issue 19). Those are the kernels of
// LIFE, LocalViT's FFN and the DW shortcuts. Here, per tap (i, j) of the kernel and per channel:
//   grad_weight[c, i, j] = sum over b, y, x of grad[b, c, y, x] * input[b, c, y - pad + i*dil, x - pad + j*dil]
// (out-of-map inputs are the zero padding). Channels-last makes every product a contiguous run over the
// channels, which the compiler vectorizes; threads split the channels, so none of them shares a sum.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

constexpr int64_t kChannelBlock = 64;

template <typename T>
void weight_grad(const at::Tensor& grad, const at::Tensor& input, at::Tensor& taps, int64_t kernel, int64_t padding,
                 int64_t dilation) {
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  const T *gp = grad.data_ptr<T>(), *xp = input.data_ptr<T>();
  T* tp = taps.data_ptr<T>();  // (k, k, C), zero-filled
  const int64_t gb = grad.stride(0), gy = grad.stride(2), gx = grad.stride(3);
  const int64_t xb = input.stride(0), xy = input.stride(2), xx = input.stride(3);
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kChannelBlock, cn = std::min(kChannelBlock, channels - c0);
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t y = 0; y < height; ++y) {
          for (int64_t x = 0; x < width; ++x) {
            const T* g = gp + b * gb + y * gy + x * gx + c0;
            for (int64_t i = 0; i < kernel; ++i) {
              const int64_t iy = y - padding + i * dilation;
              if (iy < 0 || iy >= height) continue;
              for (int64_t j = 0; j < kernel; ++j) {
                const int64_t ix = x - padding + j * dilation;
                if (ix < 0 || ix >= width) continue;
                const T* in = xp + b * xb + iy * xy + ix * xx + c0;
                T* tap = tp + (i * kernel + j) * channels + c0;
#pragma omp simd
                for (int64_t c = 0; c < cn; ++c) tap[c] += g[c] * in[c];
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor depthwise_weight_grad(const at::Tensor& grad, const at::Tensor& input, int64_t kernel, int64_t padding,
                                 int64_t dilation) {
  for (const auto& t : {grad, input}) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.stride(1) == 1,
                "depthwise_weight_grad: expected channels-last CPU maps (B, C, H, W)");
  }
  TORCH_CHECK(grad.sizes() == input.sizes(), "depthwise_weight_grad: stride 1 and same padding only");
  auto taps = at::zeros({kernel, kernel, input.size(1)}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "depthwise_weight_grad",
                             [&] { weight_grad<scalar_t>(grad, input, taps, kernel, padding, dilation); });
  return taps.permute({2, 0, 1}).unsqueeze(1).contiguous();  // (C, 1, k, k), as the weight
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weight_grad", &depthwise_weight_grad, "depth-wise conv weight gradient, channels-last, stride 1");
}
