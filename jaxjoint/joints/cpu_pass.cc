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
// deterministic. Each float32 sum is at most about kChunkRows + log2(chunks)
// roundings deep along columns and kSegment / kLanes + V / kSegment along rows; at
// V = 4096 their largest relative errors against float64 (1.5e-7 rows, 1.4e-7
// columns) are those of XLA's reductions (1.4e-7, 2.4e-7).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 32;       // two AVX-512 registers of float32: two independent sums
constexpr int64_t kSegment = 1024;   // columns summed in lanes before a row's total
constexpr int64_t kChunkRows = 64;   // rows whose column sums are accumulated in one partial
// Partials start kSkew floats into their buffer and lie partial_stride(V) floats
// apart, so that a partial's column b does not share its address modulo 4 KiB with
// the table's column b (large buffers, XLA's and this vector's, start at or near a
// page boundary; a core that sees the two alike stalls each load of a row behind
// the stores to its partial, "4K aliasing": about 10% of a pass, measured).
constexpr int64_t kSkew = 40;
inline int64_t partial_stride(int64_t v) { return v + 56; }

struct Pass {
  const float* e;
  const float* u;
  const float* w;
  const float* weight;
  float* row_sum;
  int64_t n, v, chunks;
  std::vector<float> partials;  // each chunk's weighted column sums (see kSkew)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void run_chunk(Pass& p, int64_t chunk) {
  const int64_t v = p.v;
  const int64_t vectorised = v - v % kLanes;
  float* col = p.partials.data() + kSkew + chunk * partial_stride(v);
  std::fill(col, col + v, 0.0f);
  const int64_t end = std::min(p.n, (chunk + 1) * kChunkRows);
  for (int64_t a = chunk * kChunkRows; a < end; ++a) {
    const float* row = p.e + a * v;
    const float ua = p.u[a];
    const float wa = p.weight[a];
    float total = 0.0f;
    for (int64_t start = 0; start < vectorised; start += kSegment) {
      const int64_t stop = std::min(vectorised, start + kSegment);
#if defined(__AVX512F__)
      // (what the portable loop below computes, written out: GCC 12 does not keep
      // its 32 lanes in two registers, and the pass is 15-20% slower)
      const __m512 u16 = _mm512_set1_ps(ua), w16 = _mm512_set1_ps(wa);
      __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
      for (int64_t b = start; b < stop; b += kLanes) {
        const __m512 x0 = _mm512_div_ps(_mm512_loadu_ps(row + b), _mm512_add_ps(u16, _mm512_loadu_ps(p.w + b)));
        const __m512 x1 =
            _mm512_div_ps(_mm512_loadu_ps(row + b + 16), _mm512_add_ps(u16, _mm512_loadu_ps(p.w + b + 16)));
        sum0 = _mm512_add_ps(sum0, x0);
        sum1 = _mm512_add_ps(sum1, x1);
        _mm512_storeu_ps(col + b, _mm512_fmadd_ps(w16, x0, _mm512_loadu_ps(col + b)));
        _mm512_storeu_ps(col + b + 16, _mm512_fmadd_ps(w16, x1, _mm512_loadu_ps(col + b + 16)));
      }
      total += _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
#else
      float lanes[kLanes] = {};
      for (int64_t b = start; b < stop; b += kLanes) {
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
#endif
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
  p->partials.resize(kSkew + std::max<int64_t>(p->chunks, 1) * partial_stride(p->v));
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), p->chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([p] { drain(*p); });
  drain(*p);
  while (p->done.load(std::memory_order_acquire) < p->chunks) std::this_thread::yield();

  // Pairwise tree over the chunks' partials, in a fixed order.
  float* parts = p->partials.data() + kSkew;
  const int64_t stride_v = partial_stride(p->v);
  for (int64_t stride = 1; stride < p->chunks; stride *= 2) {
    for (int64_t c = 0; c + stride < p->chunks; c += 2 * stride) {
      float* into = parts + c * stride_v;
      const float* from = parts + (c + stride) * stride_v;
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
