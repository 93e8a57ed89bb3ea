"""Training many models at once: the vectorised and stacked paths, Triton kernels, CUDA graphs."""
