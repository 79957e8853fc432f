// Sliding-window dilated attention (DilateFormer's SWDA) on the CPU, fused: every query visits its own
// k x k neighbourhood (dilation rate of its head) once, keeps its k*k logits in registers, and writes
// its output row; nothing of size (H*W, k*k, d) is ever built. The eager form in dilated.py reads the
// whole map once per offset, which is memory-bound on small maps (results/benchmarks.md, issue 19).
//
// Layout: q, k, v, out, grad_out are (B, heads, H*W, d) with unit stride along d (any other strides,
// as split_heads makes them); attn is (B, heads, H*W, k*k), contiguous, 0 for keys outside the map,
// which are left out of the softmax. Work is split over (batch, head) pairs: every pair writes only
// its own slice of out, grad_q, grad_k and grad_v, so the scatter of the backward needs no atomics.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Strides {
  int64_t batch, head, token;  // the stride along d is 1
  explicit Strides(const at::Tensor& t) : batch(t.stride(0)), head(t.stride(1)), token(t.stride(2)) {}
  int64_t at(int64_t b, int64_t h) const { return b * batch + h * head; }
};

template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < d; ++c) acc += a[c] * b[c];
  return acc;
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) y[c] += alpha * x[c];
}

// Token index of every key of query (y, x), or -1 outside the map; row-major over the kernel.
inline void neighbours(int64_t y, int64_t x, int64_t height, int64_t width, int64_t kernel, int64_t rate,
                       int64_t* keys) {
  const int64_t reach = kernel / 2;
  for (int64_t i = 0; i < kernel; ++i) {
    const int64_t ky = y + (i - reach) * rate;
    for (int64_t j = 0; j < kernel; ++j) {
      const int64_t kx = x + (j - reach) * rate;
      const bool inside = ky >= 0 && ky < height && kx >= 0 && kx < width;
      keys[i * kernel + j] = inside ? ky * width + kx : -1;
    }
  }
}

template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& attn,
             int64_t height, int64_t width, const std::vector<int64_t>& rates, int64_t kernel) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(3), kk = kernel * kernel;
  const T scale = T(1) / std::sqrt(T(d));
  const Strides sq(q), sk(k), sv(v), so(out);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T *op = out.data_ptr<T>(), *ap = attn.data_ptr<T>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys(kk);
    std::vector<T> logits(kk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const T *qh = qp + sq.at(b, h), *kh = kp + sk.at(b, h), *vh = vp + sv.at(b, h);
      T* oh = op + so.at(b, h);
      T* ah = ap + bh * height * width * kk;
      for (int64_t y = 0; y < height; ++y) {
        for (int64_t x = 0; x < width; ++x) {
          const int64_t n = y * width + x;
          neighbours(y, x, height, width, kernel, rates[h], keys.data());
          const T* qn = qh + n * sq.token;
          T top = -std::numeric_limits<T>::infinity();
          for (int64_t o = 0; o < kk; ++o) {
            if (keys[o] < 0) continue;
            logits[o] = scale * dot(qn, kh + keys[o] * sk.token, d);
            top = std::max(top, logits[o]);
          }
          T total = 0;
          for (int64_t o = 0; o < kk; ++o) {
            logits[o] = keys[o] < 0 ? T(0) : std::exp(logits[o] - top);
            total += logits[o];
          }
          T* on = oh + n * so.token;
          T* an = ah + n * kk;
          for (int64_t c = 0; c < d; ++c) on[c] = 0;
          for (int64_t o = 0; o < kk; ++o) {
            an[o] = logits[o] / total;
            if (keys[o] >= 0) axpy(an[o], vh + keys[o] * sv.token, on, d);
          }
        }
      }
    }
  });
}

template <typename T>
void backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& attn, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v, int64_t height,
              int64_t width, const std::vector<int64_t>& rates, int64_t kernel) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(3), kk = kernel * kernel;
  const T scale = T(1) / std::sqrt(T(d));
  const Strides sg(grad), sq(q), sk(k), sv(v), sgq(grad_q), sgk(grad_k), sgv(grad_v);
  const T *gp = grad.data_ptr<T>(), *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T* ap = attn.data_ptr<T>();
  T *gqp = grad_q.data_ptr<T>(), *gkp = grad_k.data_ptr<T>(), *gvp = grad_v.data_ptr<T>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys(kk);
    std::vector<T> grad_logits(kk);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const T *gh = gp + sg.at(b, h), *qh = qp + sq.at(b, h), *kh = kp + sk.at(b, h), *vh = vp + sv.at(b, h);
      T *gqh = gqp + sgq.at(b, h), *gkh = gkp + sgk.at(b, h), *gvh = gvp + sgv.at(b, h);
      const T* ah = ap + bh * height * width * kk;
      for (int64_t n = 0; n < height * width; ++n) {  // grad_k and grad_v are sums: start them at 0
        for (int64_t c = 0; c < d; ++c) gkh[n * sgk.token + c] = gvh[n * sgv.token + c] = 0;
      }
      for (int64_t y = 0; y < height; ++y) {
        for (int64_t x = 0; x < width; ++x) {
          const int64_t n = y * width + x;
          neighbours(y, x, height, width, kernel, rates[h], keys.data());
          const T *gn = gh + n * sg.token, *qn = qh + n * sq.token, *an = ah + n * kk;
          // softmax backward: d logit_o = a_o * (d a_o - sum_o' a_o' d a_o'), with d a_o = grad . v_o
          T weighted = 0;
          for (int64_t o = 0; o < kk; ++o) {
            if (keys[o] < 0) continue;
            grad_logits[o] = dot(gn, vh + keys[o] * sv.token, d);
            weighted += an[o] * grad_logits[o];
          }
          T* gqn = gqh + n * sgq.token;
          for (int64_t c = 0; c < d; ++c) gqn[c] = 0;
          for (int64_t o = 0; o < kk; ++o) {
            if (keys[o] < 0) continue;
            const T g = an[o] * (grad_logits[o] - weighted) * scale;
            axpy(g, kh + keys[o] * sk.token, gqn, d);
            axpy(g, qn, gkh + keys[o] * sgk.token, d);
            axpy(an[o], gn, gvh + keys[o] * sgv.token, d);
          }
        }
      }
    }
  });
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.stride(3) == 1, name,
              ": expected a CPU tensor (B, heads, H*W, d) with unit stride along d");
}

std::vector<at::Tensor> dilated_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        int64_t height, int64_t width, std::vector<int64_t> rates, int64_t kernel) {
  for (const auto& [t, name] : {std::pair{q, "q"}, {k, "k"}, {v, "v"}}) check(t, name);
  TORCH_CHECK(static_cast<int64_t>(rates.size()) == q.size(1), "one dilation rate per head");
  auto out = at::empty_like(q);  // keeps the head-interleaved strides of q: merging heads stays a view
  auto attn = at::empty({q.size(0), q.size(1), q.size(2), kernel * kernel}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dilated_forward",
                             [&] { forward<scalar_t>(q, k, v, out, attn, height, width, rates, kernel); });
  return {out, attn};
}

std::vector<at::Tensor> dilated_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& attn, int64_t height, int64_t width,
                                         std::vector<int64_t> rates, int64_t kernel) {
  for (const auto& [t, name] : {std::pair{grad, "grad"}, {q, "q"}, {k, "k"}, {v, "v"}}) check(t, name);
  auto grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dilated_backward", [&] {
    backward<scalar_t>(grad, q, k, v, attn.contiguous(), grad_q, grad_k, grad_v, height, width, rates, kernel);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dilated_forward, "dilated attention forward: (out, attn)");
  m.def("backward", &dilated_backward, "dilated attention backward: (grad_q, grad_k, grad_v)");
}
