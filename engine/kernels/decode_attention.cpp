// Decode attention on CPU, reading K/V straight from the token-granular pool (a "paged" kernel).
//
// One query token per request attends over the request's cached positions, whose pool slots are the
// first lens[b] entries of slots[b]. Requests that share a prefix share its slots, so they read the same
// memory and the shared part stays in the CPU caches: nothing is gathered or copied per step.
// The G = H / KVH query heads of a kv head read the same rows (grouped-query attention).
// Softmax and sums in float32 whatever the pool's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kTile = 32;  // positions whose V rows are converted and summed together
constexpr int64_t kMaxHeadDim = 256;

// kHeadDim > 0: the head size fixed at compile time, so that a head's vectors live in registers (the
// common sizes are instantiated below); 0: any size up to kMaxHeadDim, read at run time.
template <typename T, int64_t kHeadDim>
void decode_attention_impl(const T* q, const T* k_pool, const T* v_pool, const int64_t* slots,
                           const int64_t* lens, T* out, int64_t batch, int64_t heads, int64_t kv_heads,
                           int64_t runtime_head_dim, int64_t slots_stride, float scale) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  const int64_t group = heads / kv_heads;
  const int64_t row = kv_heads * head_dim;  // elements per pool slot: all kv heads of one position
  // One task per request: its pool rows (every kv head of a position) are read front to back, which the
  // hardware prefetcher streams well; splitting by head would skip through rows.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(heads * head_dim), acc(heads * head_dim), tile(row * kTile), scores, total(heads);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      const int64_t* slot = slots + b * slots_stride;
      for (int64_t i = 0; i < heads * head_dim; ++i) qf[i] = static_cast<float>(q[b * heads * head_dim + i]) * scale;
      scores.resize(heads * len);
      // Scores, four positions at a time: four independent dot products per query head share each load
      // of q and keep the vector units busy; -ffast-math lets the compiler vectorise each dot product.
      int64_t j = 0;
      for (; j + 4 <= len; j += 4) {
        const T* k0 = k_pool + slot[j] * row;
        const T* k1 = k_pool + slot[j + 1] * row;
        const T* k2 = k_pool + slot[j + 2] * row;
        const T* k3 = k_pool + slot[j + 3] * row;
        for (int64_t qh = 0; qh < heads; ++qh) {
          const int64_t offset = (qh / group) * head_dim;
          const float* qv = qf.data() + qh * head_dim;
          float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) {
            const float qd = qv[d];
            d0 += qd * static_cast<float>(k0[offset + d]);
            d1 += qd * static_cast<float>(k1[offset + d]);
            d2 += qd * static_cast<float>(k2[offset + d]);
            d3 += qd * static_cast<float>(k3[offset + d]);
          }
          float* s = scores.data() + qh * len + j;
          s[0] = d0, s[1] = d1, s[2] = d2, s[3] = d3;
        }
      }
      for (; j < len; ++j) {
        const T* key = k_pool + slot[j] * row;
        for (int64_t qh = 0; qh < heads; ++qh) {
          const T* kh = key + (qh / group) * head_dim;
          const float* qv = qf.data() + qh * head_dim;
          float dot = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qv[d] * static_cast<float>(kh[d]);
          scores[qh * len + j] = dot;
        }
      }
      for (int64_t qh = 0; qh < heads; ++qh) {
        float* s = scores.data() + qh * len;
        float max_score = s[0], sum = 0.f;  // len >= 1; no infinities: built with -ffast-math
        for (int64_t j = 1; j < len; ++j) max_score = std::max(max_score, s[j]);
        for (int64_t j = 0; j < len; ++j) {
          s[j] = expf(s[j] - max_score);
          sum += s[j];
        }
        total[qh] = sum;
      }
      // Values, a tile of positions at a time: their V rows are converted to one float tile, which every
      // query head then reads from L1, summing p_j * V_j in registers.
      for (int64_t i = 0; i < heads * head_dim; ++i) acc[i] = 0.f;
      for (int64_t j0 = 0; j0 < len; j0 += kTile) {
        const int64_t n = std::min(kTile, len - j0);
        for (int64_t jj = 0; jj < n; ++jj) {
          const T* value = v_pool + slot[j0 + jj] * row;
          for (int64_t e = 0; e < row; ++e) tile[jj * row + e] = static_cast<float>(value[e]);
        }
        for (int64_t qh = 0; qh < heads; ++qh) {
          const float* p = scores.data() + qh * len + j0;
          const float* vh = tile.data() + (qh / group) * head_dim;
          float a[kHeadDim > 0 ? kHeadDim : kMaxHeadDim] = {};
          for (int64_t jj = 0; jj < n; ++jj)
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p[jj] * vh[jj * row + d];
          float* acc_h = acc.data() + qh * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) acc_h[d] += a[d];
        }
      }
      for (int64_t qh = 0; qh < heads; ++qh) {
        const float inv = 1.f / total[qh];
        for (int64_t d = 0; d < head_dim; ++d)
          out[(b * heads + qh) * head_dim + d] = static_cast<T>(acc[qh * head_dim + d] * inv);
      }
    }
  });
}

}  // namespace

// q [B, H, D]; k_pool, v_pool [S, KVH, D] (one layer); slots [B, >= max(lens)] int64; lens [B] int64.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor slots,
                               torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(), "dtypes differ");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "slots and lens are int64");
  TORCH_CHECK(lens.numel() == q.size(0) && lens.min().item<int64_t>() >= 1 &&
              lens.max().item<int64_t>() <= slots.size(1), "each request attends to 1..slots.size(1) positions");
  TORCH_CHECK(q.size(1) % k_pool.size(1) == 0 && q.size(2) == k_pool.size(2), "heads do not match the pool");
  TORCH_CHECK(q.size(2) <= kMaxHeadDim, "head_dim above ", kMaxHeadDim);
  q = q.contiguous();
  k_pool = k_pool.contiguous();
  v_pool = v_pool.contiguous();
  slots = slots.contiguous();
  lens = lens.contiguous();
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    auto run = [&](auto impl) {
      impl(q.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
           lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), q.size(0), q.size(1), k_pool.size(1), q.size(2),
           slots.size(1), static_cast<float>(scale));
    };
    switch (q.size(2)) {
      case 64: run(decode_attention_impl<scalar_t, 64>); break;
      case 128: run(decode_attention_impl<scalar_t, 128>); break;
      default: run(decode_attention_impl<scalar_t, 0>);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention); }
