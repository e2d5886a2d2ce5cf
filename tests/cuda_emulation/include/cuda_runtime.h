// Stands in for the CUDA toolkit's cuda_runtime.h, whose declarations would clash with the
// emulated runtime: the kernels get cuda_emulation.h instead.
#pragma once

#include "../cuda_emulation.h"
