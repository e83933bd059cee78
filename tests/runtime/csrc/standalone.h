// What sensiquant/runtime/csrc/packed_core.h takes from c10, for building it without libtorch (SQ_STANDALONE):
// kernel_check.cpp compiles the core alone, for this CPU or cross-compiled for another, to compare each vector path
// with the portable loops. Conversions round to nearest even, as c10's do.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#define TORCH_CHECK(cond, ...)                                  \
  do {                                                          \
    if (!(cond)) throw std::runtime_error("check failed: " #cond); \
  } while (0)

namespace at {

#if defined(__aarch64__)
using native_half = __fp16;  // IEEE binary16 on aarch64 (g++ has no C++ _Float16 there)
#else
using native_half = _Float16;
#endif

enum class ScalarType { Byte, Short, Int, Long };
constexpr ScalarType kByte = ScalarType::Byte, kShort = ScalarType::Short, kInt = ScalarType::Int,
                     kLong = ScalarType::Long;

struct Half {
  uint16_t x = 0;
  Half() = default;
  explicit Half(float f) {
    const native_half h = static_cast<native_half>(f);
    std::memcpy(&x, &h, 2);
  }
  operator float() const {
    native_half h;
    std::memcpy(&h, &x, 2);
    return static_cast<float>(h);
  }
};

struct BFloat16 {
  uint16_t x = 0;
  BFloat16() = default;
  explicit BFloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    x = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

}  // namespace at
