// pom_aoti_run PACKAGE IN OUT: runs an AOTInductor package of a model with pom_ext layers (compiled in Python by
// aoti_compile_and_package) in C++; the package calls the pom_ext ops of libpom_ext.
//
// IN: x; OUT: out (the package's first output).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <iostream>

#include "io.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " PACKAGE.pt2 IN.pt OUT.pt\n";
    return 2;
  }
  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  const auto in = load_tensors(argv[2]);
  const std::vector<torch::Tensor> outs = loader.run({need(in, "x")});
  TORCH_CHECK(!outs.empty(), "the package returned no output");
  c10::Dict<std::string, torch::Tensor> out;
  out.insert("out", outs[0]);
  save_tensors(argv[3], out);
  return 0;
}
