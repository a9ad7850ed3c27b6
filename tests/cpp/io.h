// Reading and writing dicts of tensors shared with Python: torch.save(dict) in, torch::pickle_save out (read
// back with torch.load).
#pragma once

#include <torch/torch.h>

#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

inline std::map<std::string, torch::Tensor> load_tensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f, "cannot read ", path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::map<std::string, torch::Tensor> out;
  for (const auto& e : torch::pickle_load(bytes).toGenericDict()) out[e.key().toStringRef()] = e.value().toTensor();
  return out;
}

inline void save_tensors(const std::string& path, const c10::Dict<std::string, torch::Tensor>& d) {
  const std::vector<char> bytes = torch::pickle_save(d);
  std::ofstream f(path, std::ios::binary);
  TORCH_CHECK(f, "cannot write ", path);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline const torch::Tensor& need(const std::map<std::string, torch::Tensor>& in, const std::string& k) {
  auto it = in.find(k);
  TORCH_CHECK(it != in.end(), "input has no entry '", k, "'");
  return it->second;
}
