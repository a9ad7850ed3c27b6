// pom_script_train MODEL IN OUT: a TorchScript model with pom_ext layers, scripted and saved in Python, trained in
// C++ with libpom_ext's registered autograd (no Python in this process).
//
// IN: x (B, T, D), pad (B, T) bool, target (B, T, D), lr (scalar), steps (scalar int64)
// OUT: out (the first forward), loss, grad.NAME for every parameter of the first backward, losses (the loss before
// each of `steps` SGD steps), double_backward_raised (1 when a gradient of a gradient raised, as it must).
// The message of that error goes to stdout ("double backward: ...").
#include <torch/script.h>
#include <torch/torch.h>

#include <iostream>
#include <string>
#include <vector>

#include "io.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt IN.pt OUT.pt\n";
    return 2;
  }
  torch::jit::Module model = torch::jit::load(argv[1]);
  model.train();
  const auto in = load_tensors(argv[2]);
  const torch::Tensor x = need(in, "x"), pad = need(in, "pad"), target = need(in, "target");
  const double lr = need(in, "lr").item<double>();
  const int64_t steps = need(in, "steps").item<int64_t>();

  std::vector<torch::Tensor> params;
  std::vector<std::string> names;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) {
    names.push_back(p.name);
    params.push_back(p.value);
  }
  auto loss_of = [&] {
    const torch::Tensor out = model.forward({x, pad}).toTensor();
    return std::make_pair(out, (out - target).pow(2).mean());
  };

  c10::Dict<std::string, torch::Tensor> out;
  {
    auto [y, loss] = loss_of();
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    loss.backward();
    out.insert("out", y.detach());
    out.insert("loss", loss.detach());
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK(params[i].grad().defined(), "parameter ", names[i], " got no gradient");
      out.insert("grad." + names[i], params[i].grad().clone());
    }
  }

  // A gradient of a gradient: the pom_ext backward ops are not differentiable, and must say so.
  bool raised = false;
  {
    auto [y, loss] = loss_of();
    auto grads = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/true, /*create_graph=*/true,
                                       /*allow_unused=*/true);
    torch::Tensor penalty = torch::zeros({}, x.options());
    for (const auto& g : grads)
      if (g.defined()) penalty = penalty + g.pow(2).sum();
    try {
      penalty.backward();
    } catch (const c10::Error& e) {
      raised = true;
      std::cout << "double backward: " << e.what_without_backtrace() << "\n";
    }
  }
  out.insert("double_backward_raised", torch::tensor(static_cast<int64_t>(raised)));

  // Plain SGD steps.
  std::vector<double> losses;
  for (int64_t s = 0; s < steps; ++s) {
    auto [y, loss] = loss_of();
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    loss.backward();
    losses.push_back(loss.item<double>());
    torch::NoGradGuard no_grad;
    for (auto& p : params) p.sub_(p.grad() * lr);
  }
  out.insert("losses", torch::tensor(losses, torch::kDouble));
  save_tensors(argv[3], out);
  return 0;
}
