// One Arnold-Gokhale pass on CPU, as an XLA FFI custom call (built by cpu_pass.py).
//
// For the local rows of the loop-invariant table E (float32[n, V]) and the vectors
// u (float32[n]), w (float32[V]) and weight (float32[n]), with x[a, b] = E[a, b] /
// (u[a] + w[b]):
//   row_sum[a] = sum_b x[a, b]            (float32[n])
//   col_sum[b] = sum_a weight[a] x[a, b]  (float32[V])
// in one read of E. XLA:CPU computes the cells into a buffer and reduces it twice
// (three sweeps, and its loops are not vectorised as tightly), so the pass it
// compiles stays far from memory bandwidth; this loop keeps the cells in registers.
//
// Summation order is fixed by the shapes alone (chunks of kChunkRows rows, lanes of
// kLanes columns, segments of kSegment columns, a pairwise tree over the chunks),
// never by the number of threads or by which thread ran which chunk: the sums are
// deterministic and as accurate as XLA's reductions (each float32 sum is at most
// ~kChunkRows + log2(chunks) roundings deep along columns and ~kSegment / kLanes +
// V / kSegment along rows).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;       // one AVX-512 register of float32
constexpr int64_t kSegment = 1024;   // columns summed in lanes before a row's total
constexpr int64_t kChunkRows = 64;   // rows whose column sums are accumulated in one partial

struct Pass {
  const float* e;
  const float* u;
  const float* w;
  const float* weight;
  float* row_sum;
  int64_t n, v, chunks;
  std::vector<float> partials;  // [chunks, v]: each chunk's weighted column sums
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void run_chunk(Pass& p, int64_t chunk) {
  const int64_t v = p.v;
  const int64_t vectorised = v - v % kLanes;
  float* col = p.partials.data() + chunk * v;
  std::fill(col, col + v, 0.0f);
  const int64_t end = std::min(p.n, (chunk + 1) * kChunkRows);
  for (int64_t a = chunk * kChunkRows; a < end; ++a) {
    const float* row = p.e + a * v;
    const float ua = p.u[a];
    const float wa = p.weight[a];
    float total = 0.0f;
    for (int64_t start = 0; start < vectorised; start += kSegment) {
      const int64_t stop = std::min(vectorised, start + kSegment);
      float lanes[kLanes] = {};
      for (int64_t b = start; b < stop; b += kLanes) {
#pragma GCC unroll 16
        for (int64_t l = 0; l < kLanes; ++l) {
          const float x = row[b + l] / (ua + p.w[b + l]);
          lanes[l] += x;
          col[b + l] += wa * x;
        }
      }
      for (int64_t width = kLanes / 2; width > 0; width /= 2) {
        for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      }
      total += lanes[0];
    }
    for (int64_t b = vectorised; b < v; ++b) {
      const float x = row[b] / (ua + p.w[b]);
      total += x;
      col[b] += wa * x;
    }
    p.row_sum[a] = total;
  }
}

// Claims chunks until none is left. Every thread that runs this (the caller and
// the helpers on XLA's pool) only waits for chunks another thread is already
// running, so a helper that starts late, or never, cannot stall the pass.
void drain(Pass& p) {
  for (int64_t chunk; (chunk = p.next.fetch_add(1)) < p.chunks;) {
    run_chunk(p, chunk);
    p.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error AgPassImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> e, ffi::Buffer<ffi::F32> u,
                      ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> weight,
                      ffi::ResultBuffer<ffi::F32> row_sum, ffi::ResultBuffer<ffi::F32> col_sum) {
  const auto dims = e.dimensions();
  if (dims.size() != 2 || u.element_count() != dims[0] || weight.element_count() != dims[0] ||
      w.element_count() != dims[1]) {
    return ffi::Error::InvalidArgument("jaxjoint AG pass: shapes must be e[n, V], u[n], w[V], weight[n]");
  }
  // Shared with the helpers, which may still hold it after this call returns.
  auto p = std::make_shared<Pass>();
  p->e = e.typed_data();
  p->u = u.typed_data();
  p->w = w.typed_data();
  p->weight = weight.typed_data();
  p->row_sum = row_sum->typed_data();
  p->n = dims[0];
  p->v = dims[1];
  p->chunks = (p->n + kChunkRows - 1) / kChunkRows;
  p->partials.resize(std::max<int64_t>(p->chunks, 1) * p->v);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), p->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([p] { drain(*p); });
  drain(*p);
  while (p->done.load(std::memory_order_acquire) < p->chunks) std::this_thread::yield();

  // Pairwise tree over the chunks' partials, in a fixed order.
  float* parts = p->partials.data();
  for (int64_t stride = 1; stride < p->chunks; stride *= 2) {
    for (int64_t c = 0; c + stride < p->chunks; c += 2 * stride) {
      float* into = parts + c * p->v;
      const float* from = parts + (c + stride) * p->v;
      for (int64_t b = 0; b < p->v; ++b) into[b] += from[b];
    }
  }
  if (p->chunks == 0) std::fill(parts, parts + p->v, 0.0f);
  std::copy(parts, parts + p->v, col_sum->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxjointAgPass, AgPassImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // e
                                  .Arg<ffi::Buffer<ffi::F32>>()  // u
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row_sum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // col_sum
);
