"""The CUDA kernels of csrc/ built for the CPU and run on an emulated GPU."""
