// Minimal helpers for the C++ tests (no test framework ships with libtorch).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

// Fails the test binary (ctest reports it) with the failed condition.
#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

// A parallel_for over a few std::threads, standing in for at::parallel_for.
struct TestThreads {
  template <class Fn>
  void operator()(int64_t begin, int64_t end, int64_t, const Fn& fn) const {
    std::vector<std::thread> threads;
    const int64_t step = std::max<int64_t>((end - begin + 2) / 3, 1);
    for (int64_t b = begin; b < end; b += step) threads.emplace_back([&, b] { fn(b, std::min(end, b + step)); });
    for (auto& t : threads) t.join();
  }
};
