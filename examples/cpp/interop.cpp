// pom_interop IN OUT: runs pom_ext::PoM on weights and inputs saved from Python and
// writes the outputs back (used by tests/test_cpp_interop.py).
//
// IN (torch.save of a dict of tensors):
//   config      int64 [dim, degree, expand, n_groups, n_sel_heads, bias] and, for a rotary layer (PoMRoPE),
//               [rope (1: 1-D, 2: 2-D), max_seq_len, max_h, max_w]
//   param.NAME  every parameter (and buffer) of the Python layer, by state-dict name
//   rotary layers: pos (T,) or (T, 2) query positions, ctx_pos (N,) or (N, 2) context positions (cross)
//   x (B, T, D), xc (B, N, D), weights (B, T) float, pad (B, T) bool, mask3 (B, T, T) for
//   self-mixing; cross_w (B, N) float, xmask3 (B, T, N) for the cross case;
//   xp (total, D), cu (B + 1,) int32, r (B, T, D)
// OUT (torch::pickle_save, readable with torch.load): one output per mask mode, the
// decode and chunked-state outputs, the gradients of sum_modes <out, r> for every
// parameter (grad.NAME), and the weights and causal output after a few Adam steps
// (trained.NAME, trained_out); for a rotary layer also its own tables before loading (table.NAME).
#include <pom_ext/pom_ext.h>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f, "pom_interop: cannot read ", path);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream f(path, std::ios::binary);
  TORCH_CHECK(f, "pom_interop: cannot write ", path);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN.pt OUT.pt\n", argv[0]);
    return 2;
  }
  std::map<std::string, torch::Tensor> in;
  for (const auto& e : torch::pickle_load(read_file(argv[1])).toGenericDict())
    in[e.key().toStringRef()] = e.value().toTensor();
  auto get = [&](const std::string& k) {
    auto it = in.find(k);
    TORCH_CHECK(it != in.end(), "pom_interop: input has no entry '", k, "'");
    return it->second;
  };

  const torch::Tensor cfg = get("config");
  auto c = [&](int i) { return cfg[i].item<int64_t>(); };
  auto options = pom_ext::PoMOptions(c(0), c(1), c(2)).n_groups(c(3)).n_sel_heads(c(4)).bias(c(5) != 0);
  const int64_t rope = cfg.numel() > 6 ? c(6) : 0;
  if (rope) options.rope(rope == 2 ? "2d" : "1d").max_seq_len(c(7)).max_h(c(8)).max_w(c(9));
  pom_ext::PoM pom(options);
  const torch::Tensor x = get("x");
  c10::Dict<std::string, torch::Tensor> out;
  for (auto& b : pom->named_buffers()) out.insert("table." + b.key(), b.value().clone());
  pom->to(x.scalar_type());
  // Rotary layers: the query positions (self-mixing: one set) and the context's for cross-mixing.
  const torch::Tensor pos = rope ? get("pos") : torch::Tensor(), ctx_pos = rope ? get("ctx_pos") : torch::Tensor();

  // Load the Python weights strictly: same names, same shapes, nothing missing or extra.
  {
    torch::NoGradGuard no_grad;
    size_t n_in = 0;
    for (const auto& [k, v] : in) n_in += k.rfind("param.", 0) == 0;
    auto params = pom->named_parameters();
    auto buffers = pom->named_buffers();
    TORCH_CHECK(params.size() + buffers.size() == n_in, "pom_interop: the C++ module has ", params.size(),
                " parameters and ", buffers.size(), " buffers, Python ", n_in, " entries");
    for (auto& b : buffers) b.value().copy_(get("param." + b.key()));
    for (auto& p : params) {
      const torch::Tensor src = get("param." + p.key());
      TORCH_CHECK(src.sizes() == p.value().sizes(), "pom_interop: parameter ", p.key(), " has shape ",
                  p.value().sizes(), " in C++, ", src.sizes(), " in Python");
      p.value().copy_(src);
    }
  }

  std::vector<std::string> order;
  for (auto& p : pom->named_parameters()) order.push_back(p.key());
  out.insert("param_order", torch::tensor(static_cast<int64_t>(order.size())));
  for (size_t i = 0; i < order.size(); ++i) out.insert("param_order." + std::to_string(i) + "." + order[i],
                                                        torch::tensor(static_cast<int64_t>(i)));

  const torch::Tensor xc = get("xc"), r = get("r"), xp = get("xp"), cu = get("cu");
  std::map<std::string, torch::Tensor> outs = {
      {"none", pom->forward(x, {}, {}, {}, pos)},
      {"causal", pom->forward(x, {}, "causal", {}, pos)},
      {"block3", pom->forward(x, {}, pom_ext::Mask::causal(3), {}, pos)},
      {"weights", pom->forward(x, {}, get("weights"), {}, pos)},
      {"pad", pom->forward(x, {}, get("pad"), {}, pos)},
      {"mask3", pom->forward(x, {}, get("mask3"), {}, pos)},
      {"cross_none", pom->forward(x, xc, {}, {}, pos, ctx_pos)},
      {"cross_weights", pom->forward(x, xc, get("cross_w"), {}, pos, ctx_pos)},
      {"cross_mask3", pom->forward(x, xc, get("xmask3"), {}, pos, ctx_pos)},
  };
  if (rope != 2) {  // packed 2-D sequences would need grid positions
    outs["packed_none"] = pom->forward(xp, {}, {}, cu);
    outs["packed_causal"] = pom->forward(xp, {}, "causal", cu);
    outs["packed_block2"] = pom->forward(xp, {}, pom_ext::Mask::causal(2), cu);
  }
  torch::Tensor loss = torch::zeros({}, x.options());
  for (const auto& [k, v] : outs) {
    out.insert(k, v.detach());
    if (v.sizes() == r.sizes()) loss = loss + (v * r).sum();
  }
  pom->zero_grad();
  loss.backward();
  for (auto& p : pom->named_parameters()) out.insert("grad." + p.key(), p.value().grad());

  {
    torch::NoGradGuard no_grad;
    // Token by token with the state, updated in place.
    pom_ext::PoMState st = pom->allocate_state(x.size(0));
    std::vector<torch::Tensor> steps;
    // 1-D rotary layers decode at the state's count; 2-D ones at the given grid positions.
    auto at_pos = [&](int64_t a, int64_t n) { return rope == 2 ? pos.narrow(0, a, n) : torch::Tensor(); };
    for (int64_t t = 0; t < x.size(1); ++t) steps.push_back(pom->step(x.narrow(1, t, 1), st, at_pos(t, 1)));
    out.insert("step", torch::cat(steps, 1));
    out.insert("step_sum", st.sum);
    out.insert("step_count", st.count);
    // Unequal chunks (3, then the rest) through state_forward.
    auto [o1, s1] = pom->state_forward(x.narrow(1, 0, 3), {}, pom_ext::PoMState(), at_pos(0, 3));
    auto [o2, s2] = pom->state_forward(x.narrow(1, 3, x.size(1) - 3), {}, s1, at_pos(3, x.size(1) - 3));
    out.insert("chunked", torch::cat({o1, o2}, 1));
    out.insert("chunked_sum", s2.sum);
  }

  // A few Adam steps on the causal output, then the weights and output after training.
  torch::optim::Adam opt(pom->parameters(), torch::optim::AdamOptions(1e-2));
  for (int i = 0; i < 5; ++i) {
    torch::Tensor l = (pom->forward(x, {}, "causal", {}, pos) - r).pow(2).mean();
    opt.zero_grad();
    l.backward();
    opt.step();
  }
  torch::NoGradGuard no_grad;
  for (auto& p : pom->named_parameters()) out.insert("trained." + p.key(), p.value().detach().clone());
  out.insert("trained_out", pom->forward(x, {}, "causal", {}, pos));

  write_file(argv[2], torch::pickle_save(out));
  return 0;
}
