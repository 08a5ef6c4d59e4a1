// Generation's matrix-vector product entered from C++: y = x W^T for a compressed layer, y allocated here.
//
// The product itself is sl_matmul of signlock_kernels.c, reached through a function pointer that Python hands over
// once (set_kernel), so that this file needs torch's headers but not the kernels' build. What it saves over the
// ctypes call: the output's allocation from Python (x.new_empty with a shape built there) and ctypes' argument
// conversion, ~4 us of a small layer's ~10 us call at batch 1 (bench/results/decode.md).
#include <torch/extension.h>

#include <new>
#include <stdexcept>

namespace {

using MatmulFn = int (*)(const void *, const void *, int64_t, void *, int, int);
MatmulFn kernel = nullptr;

void set_kernel(int64_t address) { kernel = reinterpret_cast<MatmulFn>(address); }

// x: [..., cols] float32 or bfloat16, contiguous, on the CPU, at most a few rows (the caller checks); layer: the
// address of the layer's SlLayer. The result has x's dtype and shape [..., rows].
torch::Tensor product(const torch::Tensor &x, int64_t layer, int64_t rows, int64_t cols, int64_t threads) {
    if (kernel == nullptr) throw std::runtime_error("hf_signlock: the product kernel was not set");
    auto sizes = x.sizes().vec();
    sizes.back() = rows;
    torch::Tensor y = torch::empty(sizes, x.options());
    const int dtype = x.scalar_type() == torch::kBFloat16 ? 1 : 0;
    int status;
    {
        pybind11::gil_scoped_release release;  // as the ctypes call did: other Python threads run meanwhile
        status = kernel(reinterpret_cast<const void *>(layer), x.data_ptr(), x.numel() / cols, y.data_ptr(), dtype,
                        static_cast<int>(threads));
    }
    if (status) throw std::bad_alloc();  // the kernels could not allocate their buffers: MemoryError in Python
    return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("set_kernel", &set_kernel, "the address of sl_matmul");
    m.def("product", &product, "y = x W^T by the matrix-vector kernel, y allocated here");
}
