// Index tensors whose values were checked lately (packed offsets, rotary positions), so that a check that reads
// them on the host (on CUDA a copy and a synchronization) runs once per tensor rather than at every call: the
// tensors are held weakly (a freed tensor, or a new one that reuses its memory, never matches) with the version
// they had (a change in place is checked again) and the key the check depended on (the row count, the table
// length). Inference tensors keep no version: they are checked at every call.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <mutex>
#include <vector>

namespace pom_ext {
namespace checked_once {

enum class Kind : int { offsets = 0, positions = 1 };

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  uint32_t version;
  Kind kind;
  int64_t key;
};

struct Cache {
  std::mutex mu;
  std::vector<Entry> entries;  // the latest kSize, oldest first
  static constexpr size_t kSize = 16;
};

// One cache for the whole library (an inline function's static: one instance across translation units).
inline Cache& cache() {
  static Cache c;
  return c;
}

inline bool trackable(const at::Tensor& t) { return t.defined() && !t.is_inference(); }

// Whether t's values passed the check (kind, key) and t is unchanged since.
inline bool seen(const at::Tensor& t, Kind kind, int64_t key) {
  if (!trackable(t)) return false;
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const uint32_t version = impl->version_counter().current_version();
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (const Entry& e : c.entries) {
    if (e.version == version && e.kind == kind && e.key == key) {
      auto strong = e.impl.lock();
      if (strong.get() == impl) return true;
    }
  }
  return false;
}

// Record that t's values (at their current version) passed the check (kind, key).
inline void remember(const at::Tensor& t, Kind kind, int64_t key) {
  if (!trackable(t)) return;
  const uint32_t version = t.unsafeGetTensorImpl()->version_counter().current_version();
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.entries.size() == Cache::kSize) c.entries.erase(c.entries.begin());
  c.entries.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()), version, kind, key});
}

// Runs check() unless t passed it before (and is unchanged); remembers t when it passes (check throws otherwise).
template <typename F>
inline void check(const at::Tensor& t, Kind kind, int64_t key, F&& check_values) {
  if (seen(t, kind, key)) return;
  check_values();
  remember(t, kind, key);
}

}  // namespace checked_once
}  // namespace pom_ext
