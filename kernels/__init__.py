"""fastdml's Triton kernels, installed as `fastdml.kernels`; importing it needs triton."""
