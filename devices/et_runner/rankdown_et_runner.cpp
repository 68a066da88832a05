// rankdown-et-runner: runs a rankdown .pte in ExecuTorch's C++ runtime for the device half of
// the harness (runtime_tests/on_device.py) where there is no PyTorch, e.g. a phone or an arm64
// board. The harness keeps the decoding logic; this program only runs the model.
//
//   rankdown-et-runner MODEL.pte [THREADS] [--data MODEL.ptd] [--no-weight-cache]
//
// --data: the program data file (weights stored outside the .pte, e.g. a tied embedding table).
// --no-weight-cache: XNNPACK packs each method's weights apart, as before the cache was on (the
// one-token method then holds a second packed copy: on SmolLM2, +40 MB in int4, +517 MB in fp32).
//
// Protocol (little-endian, native sizes, over stdin/stdout):
//   out  one JSON line: {"max_seq_len": N, "vocab_size": V, "load_ms": T, "one_token_method": M,
//        "huge_pages_kb": H}
//   in   int32 n, int64 start_pos, int64 tokens[n]
//   out  int32 rows, int32 cols, float32 logits[rows * cols]
//   in   int32 0: out one JSON line {"peak_rss_kb": K}, exit 0     (end of input: exit 0)
// A failure prints one line "rankdown-et-runner: error: ..." on stderr and exits 1.
// The position input is what the program's forward declares: rankdown's (and ExecuTorch's Llama
// example's) input_pos[1] = start_pos, or optimum-executorch's cache_position[n] = start_pos ..
// start_pos + n - 1, told apart by its size, as ExecuTorch's own LLM runner does.
//
// Once the methods are loaded, the packed weights are collapsed into transparent huge pages where
// the kernel can (collapse_to_huge_pages below; RANKDOWN_HUGE_PAGES=0 leaves them in 4 KiB pages).

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>

#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

// The wheel ships libexecutorch_threadpool.so but not its header; this is the one call we need
// (the size of the pool XNNPACK runs on).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::extension::make_tensor_ptr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::Program;
using executorch::aten::ScalarType;

namespace {

std::string g_model;

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "rankdown-et-runner: error: %s: %s\n", g_model.c_str(), what.c_str());
  std::exit(1);
}

std::string error_name(Error e) {
  return "ExecuTorch error " + std::to_string(static_cast<int>(e));
}

bool read_exact(void* out, size_t bytes) {
  return std::fread(out, 1, bytes, stdin) == bytes;
}

void write_exact(const void* data, size_t bytes) {
  if (std::fwrite(data, 1, bytes, stdout) != bytes) {
    fail("cannot write to the harness (pipe closed)");
  }
}

// A constant method the exporter wrote (get_max_seq_len, get_vocab_size): -1 when absent.
int64_t constant(Module& module, const std::string& name) {
  auto names = module.method_names();
  if (!names.ok() || names->count(name) == 0) {
    return -1;
  }
  auto out = module.execute(name);
  if (!out.ok() || out->empty() || !(*out)[0].isInt()) {
    fail("method " + name + " did not return an integer");
  }
  return (*out)[0].toInt();
}

// This process's peak resident memory (VmHWM), what the harness reports as the model's memory.
long peak_rss_kb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      return std::strtol(line.c_str() + 6, nullptr, 10);
    }
  }
  return -1;
}

// XNNPACK packs every weight into anonymous memory when the methods load, and each token reads all
// of it: tens of MB through 4 KiB pages is thousands of TLB misses per token. MADV_COLLAPSE (Linux
// 6.1+) moves what is already there into transparent huge pages now, whatever the THP mode a
// distribution set (Debian's `madvise` gives malloc's memory none); older kernels refuse it and
// nothing changes. SmolLM2 int4, 2 threads, interleaved (2026-12-06): the same pages through
// glibc's malloc.hugetlb tunable gave decode 1.046x for rankdown's .pte and 1.053x for
// optimum-executorch's; this collapse 0.975-1.058x and 0.972-1.006x over three runs, inside the
// host's drift. Peak RSS did not grow (122 MB). Returns the kB collapsed.
long collapse_to_huge_pages() {
#if defined(__linux__)
  constexpr int kCollapse = 25;  // MADV_COLLAPSE, which older headers lack
  constexpr unsigned long kHuge = 2ul << 20;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  long collapsed_kb = 0;
  while (std::getline(maps, line)) {
    unsigned long begin = 0, end = 0;
    char perms[8] = {0};
    char path[512] = {0};
    // "begin-end perms offset dev inode [path]": anonymous read-write mappings (no path, or the heap)
    if (std::sscanf(line.c_str(), "%lx-%lx %7s %*s %*s %*s %511s", &begin, &end, perms, path) < 3) continue;
    if (std::strncmp(perms, "rw", 2) != 0 || (path[0] != '\0' && std::strcmp(path, "[heap]") != 0)) continue;
    const unsigned long first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
    if (last <= first) continue;
    if (madvise(reinterpret_cast<void*>(first), last - first, kCollapse) == 0) {
      collapsed_kb += static_cast<long>((last - first) >> 10);
    }
  }
  return collapsed_kb;
#else
  return 0;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args;
  std::string data;
  bool weight_cache = true;
  bool usage = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--data" && i + 1 < argc) {
      data = argv[++i];
    } else if (arg == "--no-weight-cache") {
      weight_cache = false;
    } else if (arg.rfind("--", 0) == 0) {
      usage = true;
    } else {
      args.push_back(arg);
    }
  }
  if (usage || args.empty() || args.size() > 2) {
    std::fprintf(stderr, "usage: rankdown-et-runner MODEL.pte [THREADS] [--data MODEL.ptd] [--no-weight-cache]\n");
    return 2;
  }
  g_model = args[0];
  if (args.size() == 2) {
    const int threads = std::atoi(args[1].c_str());
    if (threads < 1) {
      fail("threads must be a positive integer, got " + args[1]);
    }
    executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  }

  // XNNPACK packs each method's weights apart unless its weight cache is on; with it, forward and
  // the one-token method share one packed copy (the same logits, bit for bit). A runtime without
  // the option runs as before.
  if (weight_cache) {
    executorch::runtime::BackendOptions<1> xnnpack;
    if (xnnpack.set_option("weight_cache_enabled", true) == Error::Ok) {
      (void)executorch::runtime::set_option("XnnpackBackend", xnnpack.view());
    }
  }

  const auto start = std::chrono::steady_clock::now();
  // Shared arenas: a program with the one-token method keeps its KV cache in the arena both methods
  // share (exported with share_mutable_buffers), so a prompt prefilled by forward is what it reads.
  auto owned = data.empty() ? std::make_unique<Module>(g_model, Module::LoadMode::Mmap, nullptr, nullptr, nullptr, true)
                            : std::make_unique<Module>(g_model, data, Module::LoadMode::Mmap, nullptr, nullptr,
                                                       nullptr, true);
  Module& module = *owned;
  // Full verification: the file is untrusted input.
  Error err = module.load(Program::Verification::InternalConsistency);
  if (err != Error::Ok) {
    fail("not a loadable ExecuTorch program (" + error_name(err) + ")");
  }
  // rankdown before 2026-12-04 named the one-token method "decode" (export/decoding.py's
  // LEGACY_DECODE_METHOD): TextLLMRunner sends tokens there without the prompt's cache.
  const auto listed = module.method_names();
  if (listed.ok() && listed->count("decode") > 0) {
    fail("its one-token method is named 'decode' (rankdown before 2026-12-04); ExecuTorch's TextLLMRunner "
         "sends every generated token to a method of that name without the prompt's KV cache, so an app "
         "would answer wrongly: export the bundle again");
  }
  err = module.load_method("forward");
  if (err != Error::Ok) {
    fail("cannot load method forward (" + error_name(err) + ")");
  }
  // One token at a time goes to the one-token method when the program has it (static shapes, fewer
  // delegate calls); its name is export/decoding.py's DECODE_METHOD, echoed in the header below.
  const std::string one_token = "decode_step";
  const bool has_decode = listed.ok() && listed->count(one_token) > 0;
  if (has_decode) {
    err = module.load_method(one_token);
    if (err != Error::Ok) {
      fail("cannot load method " + one_token + " (" + error_name(err) + ")");
    }
  }
  const auto forward_meta = module.method_meta("forward");
  if (!forward_meta.ok() || forward_meta->num_inputs() != 2) {
    fail("its forward does not take (tokens, positions)");
  }
  const auto position_meta = forward_meta->input_tensor_meta(1);
  if (!position_meta.ok() || position_meta->sizes().size() != 1) {
    fail("its forward's second input is not a one-dimensional position tensor");
  }
  const bool cache_positions = position_meta->sizes()[0] > 1;
  const char* huge = std::getenv("RANKDOWN_HUGE_PAGES");
  const long huge_pages_kb = huge == nullptr || std::strcmp(huge, "0") != 0 ? collapse_to_huge_pages() : 0;
  const int64_t max_seq_len = constant(module, "get_max_seq_len");
  const int64_t vocab_size = constant(module, "get_vocab_size");
  const double load_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf("{\"max_seq_len\": %s, \"vocab_size\": %s, \"load_ms\": %.3f, \"one_token_method\": %s, "
              "\"huge_pages_kb\": %ld}\n",
              max_seq_len < 0 ? "null" : std::to_string(max_seq_len).c_str(),
              vocab_size < 0 ? "null" : std::to_string(vocab_size).c_str(), load_ms,
              has_decode ? ("\"" + one_token + "\"").c_str() : "null", huge_pages_kb);
  std::fflush(stdout);

  std::vector<int64_t> tokens;
  while (true) {
    int32_t n = 0;
    int64_t start_pos = 0;
    if (!read_exact(&n, sizeof n)) {
      return 0;
    }
    if (n == 0) {
      std::printf("{\"peak_rss_kb\": %ld}\n", peak_rss_kb());
      std::fflush(stdout);
      return 0;
    }
    if (n < 0 || !read_exact(&start_pos, sizeof start_pos)) {
      fail("malformed request from the harness");
    }
    if (max_seq_len > 0 && (start_pos < 0 || start_pos + n > max_seq_len)) {
      fail("positions " + std::to_string(start_pos) + ".." + std::to_string(start_pos + n - 1) +
           " exceed the program's " + std::to_string(max_seq_len) + " positions");
    }
    tokens.resize(n);
    if (!read_exact(tokens.data(), sizeof(int64_t) * n)) {
      fail("malformed request from the harness");
    }
    auto input = make_tensor_ptr({1, n}, std::vector<int64_t>(tokens));
    const auto count = static_cast<executorch::aten::SizesType>(cache_positions ? n : 1);
    std::vector<int64_t> positions(count);
    std::iota(positions.begin(), positions.end(), start_pos);
    auto position = make_tensor_ptr({count}, std::move(positions));
    const std::string method = (n == 1 && has_decode) ? one_token : "forward";
    auto out = module.execute(method, {EValue(*input), EValue(*position)});
    if (!out.ok()) {
      fail(method + " failed (" + error_name(out.error()) + ")");
    }
    if (out->empty() || !(*out)[0].isTensor()) {
      fail(method + " returned no logits tensor");
    }
    const auto& logits = (*out)[0].toTensor();
    if (logits.scalar_type() != ScalarType::Float || logits.dim() != 3) {
      fail("logits are not a float32 [1, n, vocab] tensor");
    }
    const int32_t header[2] = {static_cast<int32_t>(logits.size(1)), static_cast<int32_t>(logits.size(2))};
    write_exact(header, sizeof header);
    write_exact(logits.const_data_ptr<float>(), sizeof(float) * logits.numel());
    std::fflush(stdout);
  }
}
