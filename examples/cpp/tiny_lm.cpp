// A 2-layer causal PoM language model in C++ alone: trains on a synthetic task,
// saves and reloads it, and decodes token by token with the recurrent state.
//
// Task: every sequence draws its tokens uniformly from one of kGroups disjoint groups
// of the vocabulary. Without context the next token is uniform over the vocabulary
// (loss ln V); reading the context through PoM narrows it to the group (ln(V / kGroups)).
//
// Exit status 0 when: the loss fell below kLossRatio of the first loss, the reloaded
// model gives identical outputs, and decoding with the state matches the parallel
// causal forward.
#include <pom_ext/pom_ext.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

constexpr int64_t kVocab = 32;
constexpr int64_t kGroups = 4;
constexpr int64_t kDim = 64;
constexpr int64_t kLayers = 2;
constexpr int64_t kBatch = 32;
constexpr int64_t kSeq = 48;
constexpr int kSteps = 60;
constexpr double kLossRatio = 0.75;

// Pre-norm residual block: x + PoM(LN(x)) (causal), then x + MLP(LN(x)).
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t dim, const pom_ext::PoMOptions& pom_options)
      : norm1(register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})))),
        mixer(register_module("mixer", pom_ext::PoM(pom_options))),
        norm2(register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})))),
        fc1(register_module("fc1", torch::nn::Linear(dim, 2 * dim))),
        fc2(register_module("fc2", torch::nn::Linear(2 * dim, dim))) {}

  torch::Tensor mlp(const torch::Tensor& x) { return fc2(torch::gelu(fc1(norm2(x)))); }

  torch::Tensor forward(torch::Tensor x) {
    x = x + mixer->forward(norm1(x), {}, "causal");
    return x + mlp(x);
  }

  // x (B, 1, D): one token, appended to the layer's state.
  torch::Tensor step(torch::Tensor x, pom_ext::PoMState& state) {
    x = x + mixer->step(norm1(x), state);
    return x + mlp(x);
  }

  torch::nn::LayerNorm norm1;
  pom_ext::PoM mixer;
  torch::nn::LayerNorm norm2;
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Block);

struct TinyLMImpl : torch::nn::Module {
  TinyLMImpl() : embed(register_module("embed", torch::nn::Embedding(kVocab, kDim))) {
    for (int64_t i = 0; i < kLayers; ++i) {
      blocks.push_back(register_module("block" + std::to_string(i),
                                       Block(kDim, pom_ext::PoMOptions(kDim, /*degree=*/2, /*expand=*/2))));
    }
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({kDim})));
    head = register_module("head", torch::nn::Linear(kDim, kVocab));
  }

  // tokens (B, T) -> logits (B, T, V).
  torch::Tensor forward(const torch::Tensor& tokens) {
    torch::Tensor x = embed(tokens);
    for (auto& b : blocks) x = b(x);
    return head(norm(x));
  }

  std::vector<pom_ext::PoMState> allocate_states(int64_t batch) {
    std::vector<pom_ext::PoMState> states;
    for (auto& b : blocks) states.push_back(b->mixer->allocate_state(batch));
    return states;
  }

  // token (B, 1) -> logits (B, 1, V); every layer's state advances by one token.
  torch::Tensor step(const torch::Tensor& token, std::vector<pom_ext::PoMState>& states) {
    torch::Tensor x = embed(token);
    for (size_t i = 0; i < blocks.size(); ++i) x = blocks[i]->step(x, states[i]);
    return head(norm(x));
  }

  torch::nn::Embedding embed;
  std::vector<Block> blocks;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(TinyLM);

// (B, T + 1) tokens: row b uses the vocabulary group g_b = {g_b, g_b + kGroups, ...}.
torch::Tensor sample_batch(int64_t batch, int64_t length) {
  torch::Tensor group = torch::randint(kGroups, {batch, 1}, torch::kLong);
  torch::Tensor member = torch::randint(kVocab / kGroups, {batch, length}, torch::kLong);
  return member * kGroups + group;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int fail(const char* what) {
  std::fprintf(stderr, "FAILED: %s\n", what);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "pom_tiny_lm.pt";
  torch::manual_seed(0);
  std::printf("pom_ext %s, torch %s, %d threads\n", pom_ext::ensure_registered(), TORCH_VERSION,
              at::get_num_threads());
  const auto t0 = std::chrono::steady_clock::now();

  TinyLM model;
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(3e-3).weight_decay(0.0));
  double first = 0, last = 0;
  std::vector<double> tail;
  for (int step = 0; step < kSteps; ++step) {
    torch::Tensor seq = sample_batch(kBatch, kSeq + 1);
    torch::Tensor inputs = seq.narrow(1, 0, kSeq), targets = seq.narrow(1, 1, kSeq);
    torch::Tensor logits = model(inputs);
    torch::Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, kVocab}), targets.reshape(-1));
    opt.zero_grad();
    loss.backward();
    opt.step();
    const double l = loss.item<double>();
    if (step == 0) first = l;
    if (step >= kSteps - 10) tail.push_back(l);
    if (step % 10 == 0 || step == kSteps - 1) std::printf("step %4d  loss %.4f\n", step, l);
  }
  for (double l : tail) last += l / tail.size();
  std::printf("loss: first %.4f, mean of last 10 %.4f (ln V = %.3f, ln(V/groups) = %.3f), %.1fs\n", first, last,
              std::log(double(kVocab)), std::log(double(kVocab / kGroups)), seconds_since(t0));
  if (!(last < kLossRatio * first)) return fail("the loss did not fall below 0.75 of the first loss");

  // Save, reload into a fresh model, compare.
  model->eval();
  torch::NoGradGuard no_grad;
  torch::Tensor tokens = sample_batch(4, 40);
  torch::Tensor expected = model(tokens);
  torch::save(model, path);
  torch::manual_seed(1);
  TinyLM reloaded;
  torch::load(reloaded, path);
  reloaded->eval();
  torch::Tensor got = reloaded(tokens);
  std::printf("reloaded from %s: outputs identical: %s\n", path.c_str(), torch::equal(got, expected) ? "yes" : "no");
  if (!torch::equal(got, expected)) return fail("the reloaded model gives different outputs");

  // Token-by-token decoding with the recurrent state (constant memory per layer).
  auto states = reloaded->allocate_states(tokens.size(0));
  std::vector<torch::Tensor> steps;
  for (int64_t t = 0; t < tokens.size(1); ++t) steps.push_back(reloaded->step(tokens.narrow(1, t, 1), states));
  torch::Tensor decoded = torch::cat(steps, 1);
  const double err = ((decoded - expected).norm() / expected.norm()).item<double>();
  std::printf("decode with state vs parallel causal forward: relative error %.3e, state count %ld\n", err,
              static_cast<long>(states[0].count[0].item<int64_t>()));
  if (!(err < 1e-5)) return fail("decoding with the state does not match the causal forward");

  // Greedy continuation of a prompt from group 1: generated tokens should stay in group 1.
  torch::Tensor prompt = torch::arange(8, torch::kLong).mul(kGroups).add(1).unsqueeze(0);
  auto gen_states = reloaded->allocate_states(1);
  torch::Tensor logits;
  for (int64_t t = 0; t < prompt.size(1); ++t) logits = reloaded->step(prompt.narrow(1, t, 1), gen_states);
  std::printf("greedy continuation of a group-1 prompt:");
  int64_t in_group = 0;
  for (int i = 0; i < 12; ++i) {
    torch::Tensor next = logits.argmax(-1);
    const int64_t tok = next.item<int64_t>();
    in_group += (tok % kGroups == 1);
    std::printf(" %ld", static_cast<long>(tok));
    logits = reloaded->step(next, gen_states);
  }
  std::printf("  (%ld/12 in the group)\nOK in %.1fs\n", static_cast<long>(in_group), seconds_since(t0));
  return 0;
}
