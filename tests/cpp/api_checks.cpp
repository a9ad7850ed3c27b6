// pom_api_checks: the C++ API's argument checks and the parts of the API that only C++ reaches
// (tests/test_cpp_interop.py runs it). Prints one line per check and exits 1 if any failed.
#include <pom_ext/pom_ext.h>
#include <torch/torch.h>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok    " : "FAIL  ") << what << "\n";
  failures += ok ? 0 : 1;
}

// fn must throw a c10::Error whose message (one line) holds every needle.
void raises(const std::string& what, const std::function<void()>& fn, const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    bool ok = msg.find('\n') == std::string::npos;
    for (const auto& n : needles) ok = ok && msg.find(n) != std::string::npos;
    check(ok, what + ": " + msg);
    return;
  }
  check(false, what + ": no error");
}

bool close(const torch::Tensor& a, const torch::Tensor& b, double tol) {
  return ((a - b).norm() / b.norm().clamp_min(1e-300)).item<double>() < tol;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const std::string isa = pom_ext::cpu_isa();
  check(isa == "base" || isa == "avx2" || isa == "avx512", "cpu_isa() = " + isa);

  pom_ext::PoM pom(pom_ext::PoMOptions(16, 3, 2).n_sel_heads(4));
  const torch::Tensor x = torch::randn({2, 7, 16});

  // Inputs that do not match the layer's parameters name the argument.
  raises("xq float64 into a float32 layer", [&] { pom(x.to(torch::kDouble)); }, {"'xq'", "Double", "Float"});
  raises("xc on the meta device", [&] { pom(x, x.to(torch::kMeta)); }, {"'xc'", "meta"});
  raises("(B, T, N) mask with the wrong T", [&] { pom->forward(x, {}, torch::ones({2, 5, 7})); },
         {"'mask'", "(B, T, N)", "(2, 7, 7)"});
  // Malformed cu_seqlens, printed on one line.
  std::vector<int64_t> offs = {0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 26, 30};
  const torch::Tensor cu = torch::tensor(offs, torch::kInt);
  raises("decreasing cu_seqlens", [&] { pom->forward(torch::randn({30, 16}), {}, "causal", cu); },
         {"'cu_seqlens'", "[0, 3, 6, 9, ..., 26, 30] (12 offsets)"});
  // States: a negative count, and the state's dtype.
  pom_ext::PoMState bad = pom->allocate_state(2);
  bad.count.fill_(-3);
  raises("negative state count", [&] { pom->step(x.narrow(1, 0, 1), bad); }, {"count", ">= 0", "-3"});
  check(pom->allocate_state(2).sum.scalar_type() == torch::kFloat, "float32 layer: float32 state sum");
  pom_ext::PoM pom64(pom_ext::PoMOptions(16, 3, 2));
  pom64->to(torch::kDouble);
  check(pom64->allocate_state(2).sum.scalar_type() == torch::kDouble, "float64 layer: float64 state sum");
  raises("half state", [&] { pom->allocate_state(2, std::nullopt, torch::kHalf); }, {"'dtype'"});

  {
    torch::NoGradGuard no_grad;
    // state_forward with its defaults (self-mixing, an empty state): one chunk sees itself whole.
    auto [out, st] = pom->state_forward(x);
    check(close(out, pom(x), 1e-5) && st.count.eq(7).all().item<bool>(), "state_forward(x) == forward(x)");
    // float64: the decode equals the causal forward to float64 precision.
    const torch::Tensor xd = x.to(torch::kDouble);
    pom_ext::PoMState s64 = pom64->allocate_state(2);
    std::vector<torch::Tensor> steps;
    for (int64_t t = 0; t < 7; ++t) steps.push_back(pom64->step(xd.narrow(1, t, 1), s64));
    check(close(torch::cat(steps, 1), pom64->forward(xd, {}, "causal"), 1e-13), "float64 decode == causal");
  }

  // The gated causal op, differentiable: equals gate * H, with gradients for hs, coeff and the bias.
  {
    const torch::Tensor hs = torch::randn({2, 9, 12}, torch::kDouble).requires_grad_();
    const torch::Tensor coeff = (torch::randn({8, 3}, torch::kDouble) * 0.5).requires_grad_();
    const torch::Tensor bias = torch::randn({4}, torch::kDouble).requires_grad_();
    const torch::Tensor y = pom_ext::poly_causal_gated(hs, coeff, bias, 3);
    const torch::Tensor gate = torch::hardsigmoid(hs.narrow(-1, 8, 4) + bias);
    const torch::Tensor H = pom_ext::poly_causal(hs.narrow(-1, 0, 8), coeff, 3);
    const torch::Tensor want = pom_ext::select(gate, H, 4);
    check(close(y, want, 1e-12), "poly_causal_gated == select(gate, poly_causal)");
    const auto g1 = torch::autograd::grad({y.sum()}, {hs, coeff, bias});
    const auto g2 = torch::autograd::grad({want.sum()}, {hs, coeff, bias});
    check(close(g1[0], g2[0], 1e-12) && close(g1[1], g2[1], 1e-12) && close(g1[2], g2[2], 1e-12),
          "poly_causal_gated gradients");
  }

  // The weighted causal op, differentiable: all-one weights give poly_causal; a left-padded row gives the row
  // alone; gradients for h, coeff and the weights.
  {
    const torch::Tensor h = torch::randn({2, 9, 8}, torch::kDouble).requires_grad_();
    const torch::Tensor coeff = (torch::randn({8, 3}, torch::kDouble) * 0.5).requires_grad_();
    const torch::Tensor ones = torch::ones({2, 9}, torch::kDouble);
    check(close(pom_ext::poly_causal_weighted(h, coeff, ones, 2), pom_ext::poly_causal(h, coeff, 2), 1e-12),
          "poly_causal_weighted(w = 1) == poly_causal");
    const torch::Tensor pad = torch::arange(9).ge(3).unsqueeze(0).expand({2, 9});
    const torch::Tensor y = pom_ext::poly_causal_weighted(h, coeff, pad);
    check(close(y.narrow(1, 3, 6), pom_ext::poly_causal(h.narrow(1, 3, 6), coeff), 1e-12) &&
              y.narrow(1, 0, 3).eq(0).all().item<bool>(),
          "poly_causal_weighted: left padding is invisible");
    const torch::Tensor w = (torch::rand({2, 9}, torch::kDouble) + 0.1).requires_grad_();
    const auto g = torch::autograd::grad({pom_ext::poly_causal_weighted(h, coeff, w).sum()}, {h, coeff, w});
    check(g[0].defined() && g[1].defined() && g[2].sizes() == w.sizes(), "poly_causal_weighted gradients");
  }

  // The gated rope op, differentiable: equals the turned gate times the rotary causal mean (2 sections, 4 gates).
  {
    const torch::Tensor hs = torch::randn({2, 9, 12}, torch::kDouble).requires_grad_();
    const torch::Tensor coeff = (torch::randn({8, 3}, torch::kDouble) * 0.5).requires_grad_();
    const torch::Tensor bias = torch::randn({4}, torch::kDouble).requires_grad_();
    const torch::Tensor cos = torch::randn({12, 2}, torch::kDouble), sin = torch::randn({12, 2}, torch::kDouble);
    const torch::Tensor gcos = torch::randn({12, 1}, torch::kDouble), gsin = torch::randn({12, 1}, torch::kDouble);
    const torch::Tensor pos = torch::randint(0, 12, {9, 2}, torch::kLong);
    const torch::Tensor y = pom_ext::poly_causal_gated_rope(hs, coeff, bias, cos, sin, gcos, gsin, pos, 2);
    const torch::Tensor gate = pom_ext::rotate(torch::hardsigmoid(hs.narrow(-1, 8, 4) + bias), gcos, gsin, pos);
    const torch::Tensor H = pom_ext::poly_causal_rope(hs.narrow(-1, 0, 8), coeff, cos, sin, pos, 2);
    const torch::Tensor want = pom_ext::select(gate, H, 4);
    check(close(y, want, 1e-12), "poly_causal_gated_rope == select(rotate(gate), poly_causal_rope)");
    const auto g1 = torch::autograd::grad({y.sum()}, {hs, coeff, bias});
    const auto g2 = torch::autograd::grad({want.sum()}, {hs, coeff, bias});
    check(close(g1[0], g2[0], 1e-12) && close(g1[1], g2[1], 1e-12) && close(g1[2], g2[2], 1e-12),
          "poly_causal_gated_rope gradients");
  }

  // The causal depthwise convolution: equals torch's conv1d on the left-padded, transposed input, with gradients;
  // ops:: and its backward agree with autograd.
  {
    const torch::Tensor x = torch::randn({2, 9, 5}, torch::kDouble).requires_grad_();
    const torch::Tensor w = torch::randn({5, 4}, torch::kDouble).requires_grad_();
    const torch::Tensor b = torch::randn({5}, torch::kDouble).requires_grad_();
    const torch::Tensor y = pom_ext::causal_conv1d(x, w, b);
    const torch::Tensor want =
        torch::conv1d(torch::constant_pad_nd(x.transpose(1, 2), {3, 0}), w.unsqueeze(1), b, std::vector<int64_t>{1},
                      std::vector<int64_t>{0}, std::vector<int64_t>{1}, 5)
            .transpose(1, 2);
    check(close(y, want, 1e-13), "causal_conv1d == conv1d of the left-padded input");
    const torch::Tensor gy = torch::randn_like(y);
    const auto g1 = torch::autograd::grad({y}, {x, w, b}, {gy});
    const auto g2 = torch::autograd::grad({want}, {x, w, b}, {gy});
    check(close(g1[0], g2[0], 1e-13) && close(g1[1], g2[1], 1e-13) && close(g1[2], g2[2], 1e-13),
          "causal_conv1d gradients");
    const auto [gx, gw, gb] = pom_ext::ops::causal_conv1d_backward(gy, x.detach(), w.detach(), b.detach());
    check(close(gx, g1[0], 1e-15) && close(gw, g1[1], 1e-15) && close(gb, g1[2], 1e-15),
          "ops::causal_conv1d_backward == the autograd gradients");
    raises("causal_conv1d: weight of another width", [&] { pom_ext::ops::causal_conv1d(x, w.narrow(0, 0, 4)); },
           {"causal_conv1d", "'weight'", "channels D"});
  }

  // The meta device: shapes through the Meta kernels, forward and backward, for every mask form of aggregate.
  // (A torch::nn module cannot be moved to the meta device in libtorch: Module::to refuses the change of tensor
  // type, so the module's own meta run is Python's, tests/test_layer.py::test_meta_device.)
  {
    const auto meta = torch::TensorOptions().device(torch::kMeta);
    const torch::Tensor h = torch::empty({2, 7, 8}, meta).requires_grad_();
    const torch::Tensor coeff = torch::empty({8, 3}, meta).requires_grad_();
    bool ok = true;
    for (const pom_ext::Mask& m : {pom_ext::Mask(), pom_ext::Mask("causal"), pom_ext::Mask::causal(3),
                                   pom_ext::Mask(torch::ones({2, 7}, meta)),
                                   pom_ext::Mask(torch::ones({2, 5, 7}, meta))}) {
      const torch::Tensor H = pom_ext::aggregate(h, coeff, m);
      ok = ok && H.device().is_meta() && H.size(0) == 2 && H.size(2) == 8;
      H.sum().backward();
      ok = ok && h.grad().sizes() == h.sizes() && coeff.grad().sizes() == coeff.sizes();
    }
    const torch::Tensor y = pom_ext::poly_causal_gated(torch::empty({2, 7, 12}, meta), coeff.detach());
    ok = ok && y.sizes() == torch::IntArrayRef({2, 7, 8});
    check(ok, "meta device: aggregate (every mask form) forward and backward, the gated op");
  }
  std::cout << (failures ? "FAILED " : "passed ") << failures << "\n";
  return failures ? 1 : 0;
}
