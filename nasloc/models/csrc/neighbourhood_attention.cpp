// Attention of every query over its own small set of keys, fused (DilateFormer's dilated k x k
// neighbourhoods). Each query visits its keys once, keeps its logits in registers and writes its
// output row; nothing of size (N, keys, d) is built. The eager form reads whole maps once per key
// offset, which is memory-bound on small maps (results/benchmarks.md, issue 19). For windows of 49
// keys a batched GEMM (SDPA over partitioned windows) is faster than this kernel: it is not used there.
//
// Layout: q, out, grad are (B, heads, N, d) and k, v (B, heads, M, d), with unit stride along d (any
// other strides, as split_heads makes them). keys is (tables, N, K) int64: the token (< M) of key slot
// o of query n, or -1 for none (outside the map, left out of the softmax); head_table (heads,) says
// which table a head uses. attn is (B, heads, N, K), 0 for missing keys. Work is split over (batch, head) pairs: every
// pair writes only its own slices of out, grad_q, grad_k and grad_v, so the scatter of the backward
// needs no atomics.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>
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

struct Plan {  // what both passes share
  int64_t batch, heads, tokens, key_tokens, d, slots;
  const int64_t* keys;        // (tables, N, K)
  const int64_t* head_table;  // (heads,)
  const int64_t* keys_of(int64_t h, int64_t n) const { return keys + (head_table[h] * tokens + n) * slots; }
};

Plan plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& keys, const at::Tensor& head_table) {
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), keys.size(2), keys.data_ptr<int64_t>(),
          head_table.data_ptr<int64_t>()};
}

// D: the channels per head as a compile-time constant (0: read at run time). With it the compiler unrolls
// the dot products and axpys of a row into a few vector instructions and keeps the row in registers.
template <typename T, int D>
void forward(const Plan& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& attn) {
  const int64_t d = D > 0 ? D : p.d;
  const T scale = T(1) / std::sqrt(T(d));
  const Strides sq(q), sk(k), sv(v), so(out);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T *op = out.data_ptr<T>(), *ap = attn.data_ptr<T>();
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> logits(p.slots);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const T *qh = qp + sq.at(b, h), *kh = kp + sk.at(b, h), *vh = vp + sv.at(b, h);
      T* oh = op + so.at(b, h);
      for (int64_t n = 0; n < p.tokens; ++n) {
        const int64_t* keys = p.keys_of(h, n);
        const T* qn = qh + n * sq.token;
        T top = -std::numeric_limits<T>::infinity();
        for (int64_t o = 0; o < p.slots; ++o) {
          if (keys[o] < 0) continue;
          logits[o] = scale * dot(qn, kh + keys[o] * sk.token, d);
          top = std::max(top, logits[o]);
        }
        T total = 0;
        for (int64_t o = 0; o < p.slots; ++o) {
          logits[o] = keys[o] < 0 ? T(0) : std::exp(logits[o] - top);
          total += logits[o];
        }
        T* on = oh + n * so.token;
        T* an = ap + (bh * p.tokens + n) * p.slots;
        for (int64_t c = 0; c < d; ++c) on[c] = 0;
        for (int64_t o = 0; o < p.slots; ++o) {
          an[o] = logits[o] / total;
          if (keys[o] >= 0) axpy(an[o], vh + keys[o] * sv.token, on, d);
        }
      }
    }
  });
}

template <typename T, int D>
void backward(const Plan& p, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& attn, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  const int64_t d = D > 0 ? D : p.d;
  const T scale = T(1) / std::sqrt(T(d));
  const Strides sg(grad), sq(q), sk(k), sv(v), sgq(grad_q), sgk(grad_k), sgv(grad_v);
  const T *gp = grad.data_ptr<T>(), *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T* ap = attn.data_ptr<T>();
  T *gqp = grad_q.data_ptr<T>(), *gkp = grad_k.data_ptr<T>(), *gvp = grad_v.data_ptr<T>();
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grad_attn(p.slots);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const T *gh = gp + sg.at(b, h), *qh = qp + sq.at(b, h), *kh = kp + sk.at(b, h), *vh = vp + sv.at(b, h);
      T *gqh = gqp + sgq.at(b, h), *gkh = gkp + sgk.at(b, h), *gvh = gvp + sgv.at(b, h);
      for (int64_t n = 0; n < p.key_tokens; ++n) {  // grad_k and grad_v are sums: start them at 0
        for (int64_t c = 0; c < d; ++c) gkh[n * sgk.token + c] = gvh[n * sgv.token + c] = 0;
      }
      for (int64_t n = 0; n < p.tokens; ++n) {
        const int64_t* keys = p.keys_of(h, n);
        const T *gn = gh + n * sg.token, *qn = qh + n * sq.token, *an = ap + (bh * p.tokens + n) * p.slots;
        // softmax backward: d logit_o = a_o * (d a_o - sum_o' a_o' d a_o'), with d a_o = grad . v_o
        T weighted = 0;
        for (int64_t o = 0; o < p.slots; ++o) {
          if (keys[o] < 0) continue;
          grad_attn[o] = dot(gn, vh + keys[o] * sv.token, d);
          weighted += an[o] * grad_attn[o];
        }
        T* gqn = gqh + n * sgq.token;
        for (int64_t c = 0; c < d; ++c) gqn[c] = 0;
        for (int64_t o = 0; o < p.slots; ++o) {
          if (keys[o] < 0) continue;
          const T g = an[o] * (grad_attn[o] - weighted) * scale;
          axpy(g, kh + keys[o] * sk.token, gqn, d);
          axpy(g, qn, gkh + keys[o] * sgk.token, d);
          axpy(an[o], gn, gvh + keys[o] * sgv.token, d);
        }
      }
    }
  });
}

// Calls kernel(std::integral_constant<int, D>) with D the head width as a compile-time constant where one is
// instantiated (the widths of the presets and search spaces, 16-64 channels per head), else D = 0 (read at
// run time).
template <typename Kernel>
void with_head_width(int64_t d, Kernel&& kernel) {
  switch (d) {
    case 16: return kernel(std::integral_constant<int, 16>{});
    case 24: return kernel(std::integral_constant<int, 24>{});
    case 32: return kernel(std::integral_constant<int, 32>{});
    case 36: return kernel(std::integral_constant<int, 36>{});
    case 48: return kernel(std::integral_constant<int, 48>{});
    case 64: return kernel(std::integral_constant<int, 64>{});
    default: return kernel(std::integral_constant<int, 0>{});
  }
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.stride(3) == 1, name,
              ": expected a CPU tensor (B, heads, N, d) with unit stride along d");
}

void check_tables(const at::Tensor& q, const at::Tensor& k, const at::Tensor& keys, const at::Tensor& head_table) {
  TORCH_CHECK(keys.dim() == 3 && keys.size(1) == q.size(2) && keys.is_contiguous() &&
                  keys.scalar_type() == at::kLong, "keys: expected contiguous int64 (tables, N, K)");
  TORCH_CHECK(keys.max().item<int64_t>() < k.size(2), "keys: a token index beyond the keys");
  TORCH_CHECK(head_table.numel() == q.size(1) && head_table.is_contiguous() && head_table.scalar_type() == at::kLong,
              "head_table: expected one contiguous int64 table index per head");
}

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& keys, const at::Tensor& head_table) {
  for (const auto& [t, name] : {std::pair{q, "q"}, {k, "k"}, {v, "v"}}) check(t, name);
  check_tables(q, k, keys, head_table);
  const Plan p = plan(q, k, keys, head_table);
  auto out = at::empty_like(q);  // keeps the head-interleaved strides of q: merging heads stays a view
  auto attn = at::empty({p.batch, p.heads, p.tokens, p.slots}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "neighbourhood_forward", [&] {
    with_head_width(p.d, [&](auto width) { forward<scalar_t, decltype(width)::value>(p, q, k, v, out, attn); });
  });
  return {out, attn};
}

std::vector<at::Tensor> attention_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& attn, const at::Tensor& keys,
                                           const at::Tensor& head_table) {
  for (const auto& [t, name] : {std::pair{grad, "grad"}, {q, "q"}, {k, "k"}, {v, "v"}}) check(t, name);
  check_tables(q, k, keys, head_table);
  const Plan p = plan(q, k, keys, head_table);
  auto grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "neighbourhood_backward", [&] {
    const auto attn_rows = attn.contiguous();
    with_head_width(p.d, [&](auto width) {
      backward<scalar_t, decltype(width)::value>(p, grad, q, k, v, attn_rows, grad_q, grad_k, grad_v);
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &attention_forward, "neighbourhood attention forward: (out, attn)");
  m.def("backward", &attention_backward, "neighbourhood attention backward: (grad_q, grad_k, grad_v)");
}
