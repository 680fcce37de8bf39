// The random weight sharing kernels of the native CPU module (gnet_cpu.cpp binds them; hf_gb/engine/native.py
// builds both files into one module).
//
// Family "hash" (hf_gb/engine/hashing.py states the function): out[t, p] = s * v[t, bucket] with
// (bucket, s) from a 31-bit hash of the bank position P = tiles[t] * numel + p, computed here for every weight
// instead of being stored. uint32 arithmetic gives the same bits as the int64 torch version: (x * M) mod 2^32,
// masked to 31 bits, is (x * M) mod 2^31.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr uint32_t kMask = 0x7FFFFFFFu, kMult = 0x45D9F3Bu, kGolden = 0x1E3779B9u;

inline uint32_t mix31(uint32_t x) {
  for (int r = 0; r < 3; ++r) {
    x = (x * kMult) & kMask;
    x ^= x >> 15;
  }
  return x;
}

// A run of positions P0 .. P0 + len - 1 that share P >> 31 hashes as uint32 lanes (what the compiler vectorizes):
// the fold of the high bits is one constant of the run.
inline void hash_run(uint64_t P0, int64_t len, uint32_t key, uint32_t* x) {
  const uint32_t kf = key ^ static_cast<uint32_t>(((P0 >> 31) * kGolden) & kMask);
  const uint32_t lo = static_cast<uint32_t>(P0) & kMask;
  for (int64_t j = 0; j < len; ++j) x[j] = mix31((lo + static_cast<uint32_t>(j)) ^ kf);
}

inline uint32_t bucket_of(uint32_t x, uint32_t buckets) {  // (x >> 1) in [0, 2^30) mapped onto [0, buckets)
  return static_cast<uint32_t>((static_cast<uint64_t>(x >> 1) * static_cast<uint64_t>(buckets)) >> 30);
}

constexpr int64_t kHashBlock = 1024;

// f(offset, len, hashes) over blocks of the hashes of positions P0 .. P0 + len - 1: each block is hashed in one
// vectorizable loop before f reads or scatters with it.
template <class F>
inline void for_hash_blocks(uint64_t P0, int64_t len, uint32_t key, F&& f) {
  uint32_t x[kHashBlock];
  for (int64_t done = 0; done < len;) {
    const uint64_t P = P0 + static_cast<uint64_t>(done);
    const uint64_t boundary = ((P >> 31) + 1) << 31;
    const int64_t run = std::min<int64_t>({len - done, kHashBlock, static_cast<int64_t>(boundary - P)});
    hash_run(P, run, key, x);
    f(done, run, x);
    done += run;
  }
}

void check_hash(const torch::Tensor& tiles, int64_t key) {
  TORCH_CHECK(tiles.dtype() == torch::kInt64 && tiles.is_contiguous() && tiles.dim() == 1, "tiles: (n,) int64");
  TORCH_CHECK(key >= 0 && key <= static_cast<int64_t>(kMask), "key must be a 31-bit value");
}

}  // namespace

torch::Tensor hash_forward(const torch::Tensor& values, const torch::Tensor& tiles, int64_t numel, int64_t key) {
  check_hash(tiles, key);
  TORCH_CHECK(values.dtype() == torch::kFloat32 && values.is_contiguous() && values.dim() == 2 &&
                  values.size(0) == tiles.size(0), "values: (n, buckets) contiguous float32 for n tiles");
  const int64_t n = values.size(0), nb = values.size(1);
  TORCH_CHECK(nb <= static_cast<int64_t>(kMask), "buckets must stay below 2^31");
  auto out = torch::empty({n, numel}, values.options());
  const float* v = values.data_ptr<float>();
  const int64_t* tl = tiles.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const uint32_t k = static_cast<uint32_t>(key), buckets = static_cast<uint32_t>(nb);
  at::parallel_for(0, n * numel, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t t = i0 / numel; t < n && t * numel < i1; ++t) {  // the tiles this range touches
      const int64_t q0 = std::max(i0, t * numel) - t * numel, q1 = std::min(i1, (t + 1) * numel) - t * numel;
      const float* vt = v + t * nb;
      float* ot = o + t * numel + q0;
      for_hash_blocks(static_cast<uint64_t>(tl[t] * numel + q0), q1 - q0, k,
                      [&](int64_t off, int64_t len, const uint32_t* x) {
                        for (int64_t j = 0; j < len; ++j) {
                          const float value = vt[bucket_of(x[j], buckets)];
                          ot[off + j] = (x[j] & 1u) ? value : -value;
                        }
                      });
    }
  });
  return out;
}

torch::Tensor hash_backward(const torch::Tensor& grad, const torch::Tensor& tiles, int64_t buckets, int64_t key) {
  check_hash(tiles, key);
  TORCH_CHECK(grad.dtype() == torch::kFloat32 && grad.dim() == 2 && grad.size(0) == tiles.size(0),
              "grad: (n, numel) float32 for n tiles");
  TORCH_CHECK(buckets >= 1 && buckets <= static_cast<int64_t>(kMask), "buckets must be in [1, 2^31)");
  auto g = grad.contiguous();
  const int64_t n = g.size(0), numel = g.size(1);
  const int threads = std::max(1, at::get_num_threads());
  const int64_t parts = std::min<int64_t>(threads, std::max<int64_t>(1, numel / (1 << 14)));
  // Per (tile, part) accumulators, summed after: no atomics, and the sum's order does not depend on scheduling.
  auto acc = torch::zeros({n, parts, buckets}, g.options().dtype(torch::kFloat64));
  const float* gp = g.data_ptr<float>();
  const int64_t* tl = tiles.data_ptr<int64_t>();
  double* a = acc.data_ptr<double>();
  const uint32_t k = static_cast<uint32_t>(key), nb = static_cast<uint32_t>(buckets);
  const int64_t per = (numel + parts - 1) / parts;
  at::parallel_for(0, n * parts, 1, [&](int64_t task0, int64_t task1) {
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t t = task / parts, p0 = std::min(numel, (task % parts) * per), p1 = std::min(numel, p0 + per);
      double* at_ = a + task * buckets;
      const float* gt = gp + t * numel + p0;
      for_hash_blocks(static_cast<uint64_t>(tl[t] * numel + p0), p1 - p0, k,
                      [&](int64_t off, int64_t len, const uint32_t* x) {
                        for (int64_t j = 0; j < len; ++j) {
                          const double value = gt[off + j];
                          at_[bucket_of(x[j], nb)] += (x[j] & 1u) ? value : -value;
                        }
                      });
    }
  });
  return acc.sum(1).to(torch::kFloat32);
}
