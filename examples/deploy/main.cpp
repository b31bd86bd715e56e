// Loads an AOTInductor package written by sparseflow.export and runs it on the GPU: no Python, no SparseFlow.
//
//   run_package model.pt2 T N C H W [reps]
//
// The package accepts exactly the shapes it was exported for ([T, N, C, H, W] fp16 for the benchmark models; see
// the .json written beside it). Every call starts from reset neurons. Prints the output shape, the first logits,
// the top class of each sample and the mean time per call.
#include <torch/torch.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 7) {
    std::cerr << "usage: " << argv[0] << " model.pt2 T N C H W [reps]\n";
    return 2;
  }
  const std::string path = argv[1];
  std::vector<int64_t> shape;
  for (int i = 2; i < 7; ++i) shape.push_back(std::atoll(argv[i]));
  const int reps = argc > 7 ? std::atoi(argv[7]) : 50;
  if (!torch::cuda::is_available()) {
    std::cerr << "a CUDA device is needed: the package holds GPU kernels\n";
    return 2;
  }
  c10::InferenceMode guard;
  torch::inductor::AOTIModelPackageLoader loader(path);
  // a deterministic input in [0, 1): the images the model expects, repeated or not over T, are up to the caller
  auto x = torch::rand(shape, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kHalf));
  std::vector<torch::Tensor> inputs{x};

  std::vector<torch::Tensor> out = loader.run(inputs);  // warm-up (loads the kernels)
  torch::cuda::synchronize();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) out = loader.run(inputs);
  torch::cuda::synchronize();
  auto t1 = std::chrono::steady_clock::now();
  const double ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / reps;

  const torch::Tensor y = out.at(0).to(torch::kFloat).cpu();
  std::cout << "output shape " << y.sizes() << "\n";
  std::cout << "first logits " << y.flatten().slice(0, 0, 5) << "\n";
  // logits [T, N, classes]: the class of each sample from the mean over time steps
  const torch::Tensor mean = y.dim() == 3 ? y.mean(0) : y;
  std::cout << "top class per sample " << mean.argmax(-1) << "\n";
  std::cout << "mean " << ms << " ms per call over " << reps << " calls\n";
  return 0;
}
