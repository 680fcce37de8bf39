// The g-net hot loop on CPU, for float32 banks (hf_gb/engine/native.py builds it with hash_cpu.cpp;
// hf_gb/engine/kernels.py states the contract):
//   W[t, i, j] = sum_k w2[t, k] relu(A[t, i, k] + B[t, j, k])            (forward, optionally double-centred)
//   mA[t, i, k] = sum_j G[t, i, j] [A + B > 0],  mB[t, k, j] = sum_i (same)  (the backward's two masked sums)
//
// The forward uses w relu(a + b) = max(w a, -w b) + w b for w > 0 and min(w a, -w b) + w b for w < 0, so each
// hidden unit costs two vector operations per weight (max or min, add) instead of three (add, max, multiply-add);
// sum_k w b is one column constant per tile. Hidden units are visited positive-w first, so the choice of max or
// min is a loop bound, not a branch. Accumulators for 64 columns stay in registers across the loop over k.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "rows.h"

namespace {

// Per tile: the hidden units ordered positive-w first, -w b transposed to (h, C) in that order, and sum_k w b.
struct Table {
  std::vector<int> order;
  int npos = 0;
};

template <int JB>
inline void forward_block(const float* __restrict ak, const float* __restrict nbt, const float* __restrict colsum,
                          int npos, int h, int64_t C, int64_t j0, float* __restrict out) {
  float acc[JB];
  for (int jj = 0; jj < JB; ++jj) acc[jj] = colsum[j0 + jj];
  for (int k = 0; k < npos; ++k) {
    const float a = ak[k];
    const float* __restrict b = nbt + k * C + j0;
#pragma omp simd
    for (int jj = 0; jj < JB; ++jj) acc[jj] += std::max(a, b[jj]);
  }
  for (int k = npos; k < h; ++k) {
    const float a = ak[k];
    const float* __restrict b = nbt + k * C + j0;
#pragma omp simd
    for (int jj = 0; jj < JB; ++jj) acc[jj] += std::min(a, b[jj]);
  }
  for (int jj = 0; jj < JB; ++jj) out[j0 + jj] = acc[jj];
}

inline void forward_row(const float* ak, const float* nbt, const float* colsum, int npos, int h, int64_t C,
                        float* out) {
  int64_t j0 = 0;
  for (; j0 + 64 <= C; j0 += 64) forward_block<64>(ak, nbt, colsum, npos, h, C, j0, out);
  for (; j0 + 16 <= C; j0 += 16) forward_block<16>(ak, nbt, colsum, npos, h, C, j0, out);
  for (; j0 < C; ++j0) {
    float s = colsum[j0];
    for (int k = 0; k < npos; ++k) s += std::max(ak[k], nbt[k * C + j0]);
    for (int k = npos; k < h; ++k) s += std::min(ak[k], nbt[k * C + j0]);
    out[j0] = s;
  }
}

// Every column's mean over the rows of tile t, into mean (C values); returns the tile's sum.
inline float column_means(const Rows& rows, int64_t t, float* mean) {
  const int64_t R = rows.R, C = rows.C;
  for (int64_t j = 0; j < C; ++j) mean[j] = 0.f;
  for (int64_t i = 0; i < R; ++i) {
    const float* row = rows.row(t, i);
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) mean[j] += row[j];
  }
  float total = 0.f;
  const float inv = 1.f / static_cast<float>(R);
  for (int64_t j = 0; j < C; ++j) {
    total += mean[j];
    mean[j] *= inv;
  }
  return total;
}

inline void center_columns(const Rows& rows, int64_t t) {
  std::vector<float> mean(rows.C);
  column_means(rows, t, mean.data());
  for (int64_t i = 0; i < rows.R; ++i) {
    float* row = rows.row(t, i);
#pragma omp simd
    for (int64_t j = 0; j < rows.C; ++j) row[j] -= mean[j];
  }
}

inline void center_row(float* row, int64_t C) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < C; ++j) s += row[j];
  const float mean = s / static_cast<float>(C);
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) row[j] -= mean;
}

// Tasks of one parallel loop: whole tiles when there are enough of them, else blocks of rows.
inline int64_t row_blocks(int64_t n, int64_t R) {
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  return n >= want ? 1 : std::min(R, (want + n - 1) / n);
}

}  // namespace

void check_tables(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& w2) {
  TORCH_CHECK(A.dtype() == torch::kFloat32 && B.dtype() == torch::kFloat32 && w2.dtype() == torch::kFloat32,
              "the native g-net kernel takes float32 tables");
  TORCH_CHECK(A.dim() == 3 && B.dim() == 3 && w2.dim() == 2 && B.size(0) == A.size(0) && w2.size(0) == A.size(0) &&
                  B.size(2) == A.size(2) && w2.size(1) == A.size(2),
              "tables A (n, R, h), B (n, C, h), w2 (n, h)");
}

void forward_rows(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& w2, bool center,
                  const Rows& out) {
  const auto Ac = A.contiguous(), Bc = B.contiguous(), wc = w2.contiguous();
  const int64_t n = Ac.size(0), R = Ac.size(1), C = Bc.size(1);
  TORCH_CHECK(out.R == R && out.C == C, "the output rows do not match the tables");
  const int h = static_cast<int>(Ac.size(2));
  auto nbt = torch::empty({n, h, C}, Ac.options());
  auto colsum = torch::empty({n, C}, Ac.options());
  const float* a = Ac.data_ptr<float>();
  const float* b = Bc.data_ptr<float>();
  const float* w = wc.data_ptr<float>();
  float* nb = nbt.data_ptr<float>();
  float* cs = colsum.data_ptr<float>();
  std::vector<Table> tables(n);

  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* wt = w + t * h;
      Table& tab = tables[t];
      for (int k = 0; k < h; ++k)
        if (wt[k] > 0) tab.order.push_back(k);
      tab.npos = static_cast<int>(tab.order.size());
      for (int k = 0; k < h; ++k)
        if (!(wt[k] > 0)) tab.order.push_back(k);
      float* nbtile = nb + t * h * C;
      float* cst = cs + t * C;
      const float* bt = b + t * C * h;
      for (int64_t j = 0; j < C; ++j) cst[j] = 0.f;
      for (int k = 0; k < h; ++k) {
        const int src = tab.order[k];
        const float wk = wt[src];
        float* __restrict row = nbtile + k * C;
        for (int64_t j = 0; j < C; ++j) row[j] = -wk * bt[j * h + src];
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) cst[j] -= row[j];
      }
    }
  });

  const int64_t blocks = row_blocks(n, R), per_block = (R + blocks - 1) / blocks;
  at::parallel_for(0, n * blocks, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> ak(h);
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t t = task / blocks, r0 = (task % blocks) * per_block, r1 = std::min(R, r0 + per_block);
      const Table& tab = tables[t];
      const float* wt = w + t * h;
      for (int64_t i = r0; i < r1; ++i) {
        const float* ai = a + (t * R + i) * h;
        for (int k = 0; k < h; ++k) ak[k] = wt[tab.order[k]] * ai[tab.order[k]];
        float* row = out.row(t, i);
        forward_row(ak.data(), nb + t * h * C, cs + t * C, tab.npos, h, C, row);
        if (center) center_row(row, C);
      }
      if (center && blocks == 1) center_columns(out, t);
    }
  });
  if (center && blocks > 1) {
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) center_columns(out, t);
    });
  }
}

torch::Tensor forward(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& w2, bool center) {
  check_tables(A, B, w2);
  auto out = torch::empty({A.size(0), A.size(1), B.size(1)}, A.options().memory_format(torch::MemoryFormat::Contiguous));
  forward_rows(A, B, w2, center, tile_rows(out));
  return out;
}

void forward_into(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& w2, bool center,
                  std::vector<torch::Tensor> tensors, const torch::Tensor& which, const torch::Tensor& offsets) {
  check_tables(A, B, w2);
  TORCH_CHECK(offsets.size(0) == A.size(0) && offsets.size(1) == A.size(1), "offsets (n, R) for tables of ", A.sizes());
  forward_rows(A, B, w2, center, weight_rows(tensors, which, offsets, B.size(1)));
}

namespace {

// Rows [i, i + RB) of one tile: their mA rows, and their contribution to the tile's mB (h, C).
template <int RB>
inline void masked_rows(const float* __restrict a, const float* __restrict g, const float* __restrict nbt,
                        float* __restrict mb, float* __restrict ma, int64_t h, int64_t C) {
  for (int64_t k = 0; k < h; ++k) {
    float ak[RB];
    for (int r = 0; r < RB; ++r) ak[r] = a[r * h + k];
    const float* __restrict nbk = nbt + k * C;
    float* __restrict mbk = mb + k * C;
    if constexpr (RB == 4) {
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < C; ++j) {
        const float nbj = nbk[j];
        const float m0 = ak[0] > nbj ? g[j] : 0.f;
        const float m1 = ak[1] > nbj ? g[C + j] : 0.f;
        const float m2 = ak[2] > nbj ? g[2 * C + j] : 0.f;
        const float m3 = ak[3] > nbj ? g[3 * C + j] : 0.f;
        s0 += m0;
        s1 += m1;
        s2 += m2;
        s3 += m3;
        mbk[j] += (m0 + m1) + (m2 + m3);
      }
      ma[k] = s0;
      ma[h + k] = s1;
      ma[2 * h + k] = s2;
      ma[3 * h + k] = s3;
    } else {
      float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
      for (int64_t j = 0; j < C; ++j) {
        const float m0 = ak[0] > nbk[j] ? g[j] : 0.f;
        s0 += m0;
        mbk[j] += m0;
      }
      ma[k] = s0;
    }
  }
}

}  // namespace

// (dA, dB, dw2, db2) of sum(G * forward(A, B, w2)), G read row by row:
// dA = w2 mA, dB = w2 mB, dw2 = sum_i A mA + sum_j B mB, since relu(p) = p [p > 0] with p = A[i] + B[j].
// With ``center`` the gradient rows are double-centred on the fly (the centring is its own backward); db2 is the
// tile sum of the rows as given.
std::vector<torch::Tensor> backward_rows(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& w2,
                                         const Rows& grad, bool center) {
  const auto Ac = A.contiguous(), Bc = B.contiguous(), wc = w2.contiguous();
  const int64_t n = Ac.size(0), R = Ac.size(1), h = Ac.size(2), C = Bc.size(1);
  TORCH_CHECK(grad.R == R && grad.C == C, "the gradient rows do not match the tables");
  const int64_t blocks = row_blocks(n, R), per_block = (R + blocks - 1) / blocks;
  auto dA = torch::empty({n, R, h}, Ac.options());
  auto dB = torch::empty({n, C, h}, Ac.options());
  auto dw2 = torch::empty({n, h}, Ac.options());
  auto nbt = torch::empty({n, h, C}, Ac.options());         // -B transposed: the mask is A[i, k] > -B[j, k]
  auto mB = torch::zeros({n, blocks, h, C}, Ac.options());  // one partial sum per row block
  auto dw2A = torch::zeros({n, blocks, h}, Ac.options());   // sum_i A mA, per row block
  auto db2 = torch::empty({n}, Ac.options());
  auto colmean = torch::empty({n, C}, Ac.options());        // of the gradient, minus its tile mean
  const float* a = Ac.data_ptr<float>();
  const float* b = Bc.data_ptr<float>();
  const float* w = wc.data_ptr<float>();
  float* sums = db2.data_ptr<float>();
  float* cm = colmean.data_ptr<float>();
  float* da = dA.data_ptr<float>();
  float* db = dB.data_ptr<float>();
  float* dw = dw2.data_ptr<float>();
  float* nb = nbt.data_ptr<float>();
  float* mb = mB.data_ptr<float>();
  float* dwa = dw2A.data_ptr<float>();

  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = 0; k < h; ++k)
        for (int64_t j = 0; j < C; ++j) nb[(t * h + k) * C + j] = -b[(t * C + j) * h + k];
      float* cmt = cm + t * C;
      sums[t] = column_means(grad, t, cmt);
      const float mean = sums[t] / static_cast<float>(R * C);
      for (int64_t j = 0; j < C; ++j) cmt[j] -= mean;
    }
  });
  at::parallel_for(0, n * blocks, 1, [&](int64_t task0, int64_t task1) {
    std::vector<float> local(4 * C);  // four gradient rows, centred when asked
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t t = task / blocks, r0 = (task % blocks) * per_block, r1 = std::min(R, r0 + per_block);
      float* mbt = mb + task * h * C;
      const float* nbtile = nb + t * h * C;
      const float* cmt = cm + t * C;
      auto load = [&](int64_t i, int rb) {
        for (int r = 0; r < rb; ++r) {
          const float* src = grad.row(t, i + r);
          float* dst = local.data() + r * C;
          if (!center) {
            std::copy(src, src + C, dst);
            continue;
          }
          float rs = 0.f;
#pragma omp simd reduction(+ : rs)
          for (int64_t j = 0; j < C; ++j) rs += src[j];
          const float rm = rs / static_cast<float>(C);
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) dst[j] = src[j] - rm - cmt[j];
        }
        return local.data();
      };
      int64_t i = r0;
      for (; i + 4 <= r1; i += 4) masked_rows<4>(a + (t * R + i) * h, load(i, 4), nbtile, mbt, da + (t * R + i) * h, h, C);
      for (; i < r1; ++i) masked_rows<1>(a + (t * R + i) * h, load(i, 1), nbtile, mbt, da + (t * R + i) * h, h, C);
      // da holds mA for these rows: turn it into w2 mA and keep sum_i A mA.
      const float* wt = w + t * h;
      float* acc = dwa + task * h;
      for (int64_t r = r0; r < r1; ++r) {
        const float* ar = a + (t * R + r) * h;
        float* dar = da + (t * R + r) * h;
        for (int64_t k = 0; k < h; ++k) {
          acc[k] += ar[k] * dar[k];
          dar[k] *= wt[k];
        }
      }
    }
  });
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* m0 = mb + t * blocks * h * C;  // the row blocks' partial sums, added into the first
      for (int64_t q = 1; q < blocks; ++q) {
        const float* mq = m0 + q * h * C;
#pragma omp simd
        for (int64_t e = 0; e < h * C; ++e) m0[e] += mq[e];
      }
      const float* wt = w + t * h;
      for (int64_t k = 0; k < h; ++k) {
        float s = 0.f;
        for (int64_t q = 0; q < blocks; ++q) s += dwa[(t * blocks + q) * h + k];
        const float* mk = m0 + k * C;
        const float* bt = b + t * C * h + k;
        float* dbt = db + t * C * h + k;
        for (int64_t j = 0; j < C; ++j) {
          s += bt[j * h] * mk[j];
          dbt[j * h] = wt[k] * mk[j];
        }
        dw[t * h + k] = s;
      }
    }
  });
  return {dA, dB, dw2, db2};
}

std::vector<torch::Tensor> backward(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& w2,
                                    const torch::Tensor& G) {
  check_tables(A, B, w2);
  TORCH_CHECK(G.dtype() == torch::kFloat32 && G.dim() == 3 && G.size(0) == A.size(0) && G.size(1) == A.size(1) &&
                  G.size(2) == B.size(1),
              "the tile gradient G must be float32 (n, R, C) for tables of ", A.sizes(), " and ", B.sizes());
  auto Gc = G.contiguous();
  return backward_rows(A, B, w2, tile_rows(Gc), false);
}

std::vector<torch::Tensor> backward_from(const torch::Tensor& A, const torch::Tensor& B, const torch::Tensor& w2,
                                         bool center, std::vector<torch::Tensor> tensors, const torch::Tensor& which,
                                         const torch::Tensor& offsets) {
  check_tables(A, B, w2);
  TORCH_CHECK(offsets.size(0) == A.size(0) && offsets.size(1) == A.size(1), "offsets (n, R) for tables of ", A.sizes());
  return backward_rows(A, B, w2, weight_rows(tensors, which, offsets, B.size(1)), center);
}

// Random weight sharing (family "hash"): hash_cpu.cpp.
torch::Tensor hash_forward(const torch::Tensor& values, const torch::Tensor& tiles, int64_t numel, int64_t key);
torch::Tensor hash_backward(const torch::Tensor& grad, const torch::Tensor& tiles, int64_t buckets, int64_t key);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "g-net tiles (n, R, C) from A (n, R, h), B (n, C, h), w2 (n, h); center: double-centred");
  m.def("forward_into", &forward_into, "forward, written to the rows at offsets[t, i] of tensors[which[t]]");
  m.def("backward", &backward, "(dA, dB, dw2, db2) of sum(G * forward(A, B, w2)) for the tile gradient G");
  m.def("backward_from", &backward_from, "backward, reading G's rows at offsets[t, i] of tensors[which[t]]");
  m.def("hash_forward", &hash_forward, "random weight sharing: (n, numel) weights from values (n, buckets)");
  m.def("hash_backward", &hash_backward, "gradient (n, buckets) of the values from the weights' gradient (n, numel)");
}
