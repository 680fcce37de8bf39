// The rows the native g-net kernels read and write (gnet_cpu.cpp): a tile tensor's, or the weights' own.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace {

// Where row i of tile t lives: in one (n, R, C) tile tensor, or (``off`` given) at element offset off[t, i] of
// tensor which[t] among ``base``, the weights themselves, each row C contiguous values.
struct Rows {
  std::vector<float*> base;
  const int64_t* which = nullptr;
  const int64_t* off = nullptr;
  int64_t R = 0, C = 0;
  float* row(int64_t t, int64_t i) const {
    return off ? base[which[t]] + off[t * R + i] : base[0] + (t * R + i) * C;
  }
};

inline Rows tile_rows(torch::Tensor& tiles) {
  Rows r;
  r.base = {tiles.data_ptr<float>()};
  r.R = tiles.size(1);
  r.C = tiles.size(2);
  return r;
}

inline Rows weight_rows(std::vector<torch::Tensor>& tensors, const torch::Tensor& which, const torch::Tensor& off,
                        int64_t C) {
  TORCH_CHECK(which.dtype() == torch::kInt64 && off.dtype() == torch::kInt64 && which.is_contiguous() &&
                  off.is_contiguous() && off.dim() == 2 && which.size(0) == off.size(0),
              "row addresses: which (n,) and offsets (n, R), contiguous int64");
  Rows r;
  for (auto& t : tensors) {
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "row addresses point into contiguous float32");
    r.base.push_back(t.data_ptr<float>());
  }
  const int64_t* w = which.data_ptr<int64_t>();
  const int64_t* o = off.data_ptr<int64_t>();
  for (int64_t t = 0; t < which.size(0); ++t) {
    TORCH_CHECK(w[t] >= 0 && w[t] < static_cast<int64_t>(tensors.size()), "tile ", t, " names no tensor");
    const int64_t numel = tensors[w[t]].numel();
    for (int64_t i = 0; i < off.size(1); ++i)
      TORCH_CHECK(o[t * off.size(1) + i] >= 0 && o[t * off.size(1) + i] + C <= numel, "row ", i, " of tile ", t,
                  " lies outside its tensor");
  }
  r.which = w;
  r.off = o;
  r.R = off.size(1);
  r.C = C;
  return r;
}

}  // namespace
