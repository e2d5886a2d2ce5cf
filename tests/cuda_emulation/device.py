"""The emulated CUDA device as tests see it: one launcher call with torch tensors in and out."""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
MODES = {"pairwise": 0, "ensemble": 1, "ensemble_logits": 2, "weights": 3}
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
DIVERGENCES = {"kl": 0, "reverse_kl": 1, "jsd": 2}
# The orders a cluster's threads may run in (emulator.h): a round of every thread at a time, or a
# warp or a block at a time as far as it goes.
SCHEDULES = ("forward", "reverse", "shuffled", "warps_forward", "warps_reverse")
SCHEDULES += ("blocks_forward", "blocks_reverse")


@dataclass(frozen=True)
class DeviceInfo:
    """fastdml::gpu::DeviceInfo: what the launchers size their grids and shared memory by."""

    num_sms: int
    smem_per_sm: int
    smem_per_block_optin: int
    clusters: bool = False  # launches of thread-block clusters (sm_90 on)


H100 = DeviceInfo(num_sms=132, smem_per_sm=233472, smem_per_block_optin=232448, clusters=True)
# As an H100.
H200 = DeviceInfo(num_sms=132, smem_per_sm=233472, smem_per_block_optin=232448, clusters=True)


@dataclass(frozen=True)
class Launch:
    """One kernel launch and what its threads did."""

    kernel: str  # the expression before <<<
    where: str  # the launching function, with its template arguments
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    cluster: int  # blocks per cluster (1 for a launch without clusters)
    dynamic_shared: int
    static_shared: int
    block_barriers: int  # __syncthreads episodes over all blocks
    cluster_barriers: int  # cluster.sync() episodes over all clusters
    warp_barriers: int
    shuffles: int

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def template_args(self) -> dict[str, str]:
        """The launcher's template arguments, e.g. {"S": "float", "KT": "3", "VEC": "4"}, from the
        "[with S = float; int KT = 3; ...]" (g++) or "[S = float, KT = 3, ...]" (clang) that ends
        its pretty name."""
        bracket = self.where[self.where.rfind("[") :]
        return dict(re.findall(r"(\w+) = ([^;,\]]+)", bracket))


@dataclass(frozen=True)
class ForwardResult:
    loss: Tensor  # [K, R] for reduction "none", else 0-dim
    ce: Tensor  # [K, R] for reduction "none", else [K]
    mimicry: Tensor
    grad: Tensor | None
    launches: list[Launch]


class EmulationError(RuntimeError):
    """A launch failed or a kernel did what a GPU would fault or hang on."""


def _per_row(value: float | Tensor, acc: torch.dtype) -> tuple[Tensor, int, int]:
    """One value or one per peer and row as a tensor of the accumulation dtype, and its peer and
    row strides (0 and 0 for one value)."""
    if isinstance(value, Tensor) and value.dim() == 2:
        assert value.dtype == acc
        return value, value.stride(0), value.stride(1)
    return torch.tensor([float(value)], dtype=acc), 0, 0


def _divergence(name: str, beta: float) -> int:
    """fastdml::gpu::LossDivergence as the binding passes it: "jsd" at beta 0 or 1 is the KL or
    the reverse KL it is defined as (computed_divergence)."""
    if name == "jsd" and beta in (0, 1):
        name = "kl" if beta == 0 else "reverse_kl"
    return DIVERGENCES[name]


def _extent_bytes(view: Tensor) -> int:
    """Bytes from the view's first element to one past its last."""
    last = sum((size - 1) * stride for size, stride in zip(view.shape, view.stride(), strict=True))
    return (last + 1) * view.element_size()


class EmulatedDevice:
    """The library built by build.py: csrc's launchers on the CPU emulation of a GPU."""

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))
        i64, dbl, ptr, i32 = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
        self._lib.emu_mutual_loss.argtypes = (
            [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr]
            + [i64, i64, i64, i32, i32, i32, dbl, dbl, dbl, i64, i32]
            + [i32, dbl, dbl, i32, ptr]
            + [i32, i32, i32, i32, i32, ctypes.c_char_p, i64]
        )
        self._lib.emu_mutual_loss.restype = i32
        self._lib.emu_scale_grad.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, i64, i32]
        self._lib.emu_scale_grad.argtypes += [i32, i32, i32, i32, i32, ctypes.c_char_p, i64]
        self._lib.emu_scale_grad.restype = i32
        self._lib.emu_launches.argtypes = [ctypes.c_char_p, i64]
        self._lib.emu_launches.restype = i64
        self._lib.emu_selftest.argtypes = [ctypes.c_char_p] + [i32] * 10
        self._lib.emu_selftest.argtypes += [ptr, ctypes.c_char_p, i64]
        self._lib.emu_selftest.restype = i32

    def mutual_loss(
        self,
        logits: Tensor,
        target: Tensor,
        weights: Tensor,
        *,
        row_scale: float | Tensor | None,
        mode: str,
        temperature: float,
        alpha: float,
        label_smoothing: float,
        ignore_index: int,
        reduction: str = "none",
        compute_grad: bool = True,
        divergence: str = "kl",
        beta: float = 0.5,
        ce_weight: float = 1.0,
        mimic_unlabeled: bool = False,
        normalizer: float | None = None,
        device: DeviceInfo = H100,
        schedule: str = "forward",
    ) -> ForwardResult:
        """launch_mutual_loss on logits [K, R, C] (unit class stride, any other), with no
        row_scale, one, or one per peer and row ([K, R], any strides), and the loss family's
        options as LossOptions names them (a normalizer is a value on the device)."""
        k, rows, classes = logits.shape
        assert logits.stride(2) == 1 and target.dtype == torch.int64
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        weights = weights.to(acc).contiguous()
        scale, scale_stride_k, scale_stride_r = _per_row(
            1.0 if row_scale is None else row_scale, acc
        )
        shapes = [(k, rows)] * 3 if reduction == "none" else [(), (k,), (k,)]
        loss, ce, mimicry = (torch.empty(shape, dtype=acc) for shape in shapes)
        grad = torch.empty(k, rows, classes, dtype=logits.dtype) if compute_grad else None
        # Alive until the launch returns: the driver copies it to the device.
        divisor = None if normalizer is None else torch.tensor([normalizer], dtype=acc)
        error = ctypes.create_string_buffer(4096)
        status = self._lib.emu_mutual_loss(
            logits.data_ptr(),
            _extent_bytes(logits),
            logits.stride(0),
            logits.stride(1),
            target.data_ptr(),
            target.stride(0),
            weights.data_ptr(),
            None if row_scale is None else scale.data_ptr(),
            0 if row_scale is None else _extent_bytes(scale),
            scale_stride_k,
            scale_stride_r,
            loss.data_ptr(),
            ce.data_ptr(),
            mimicry.data_ptr(),
            grad.data_ptr() if grad is not None else None,
            k,
            rows,
            classes,
            DTYPES[logits.dtype],
            MODES[mode],
            REDUCTIONS[reduction],
            temperature,
            alpha,
            label_smoothing,
            ignore_index,
            int(compute_grad),
            _divergence(divergence, beta),
            beta,
            ce_weight,
            int(mimic_unlabeled),
            None if divisor is None else divisor.data_ptr(),
            device.num_sms,
            device.smem_per_sm,
            device.smem_per_block_optin,
            int(device.clusters),
            SCHEDULES.index(schedule),
            error,
            len(error),
        )
        if status != 0:
            raise EmulationError(error.value.decode())
        return ForwardResult(loss, ce, mimicry, grad, self.launches())

    def scale_grad_(
        self,
        grad: Tensor,
        grad_loss: float | Tensor,
        *,
        device: DeviceInfo = H100,
        schedule: str = "forward",
    ) -> list[Launch]:
        """launch_scale_grad on grad [K, R, C] (contiguous, updated in place; its address modulo
        256 is kept on the device) with grad_loss one value or [K, R] (any strides)."""
        assert grad.is_contiguous()
        k, rows, classes = grad.shape
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        grad_loss, stride_k, stride_r = _per_row(grad_loss, acc)
        error = ctypes.create_string_buffer(4096)
        status = self._lib.emu_scale_grad(
            grad.data_ptr(),
            grad_loss.data_ptr(),
            _extent_bytes(grad_loss),
            stride_k,
            stride_r,
            k,
            rows,
            classes,
            DTYPES[grad.dtype],
            device.num_sms,
            device.smem_per_sm,
            device.smem_per_block_optin,
            int(device.clusters),
            SCHEDULES.index(schedule),
            error,
            len(error),
        )
        if status != 0:
            raise EmulationError(error.value.decode())
        return self.launches()

    def selftest(
        self,
        name: str,
        *,
        kind: int = 0,
        arg: int = 0,
        width: int = 32,
        schedule: str = "forward",
        smem_per_block_optin: int = 48 * 1024,
        threads: int = 256,
        cluster: int = 0,
        device: DeviceInfo = H100,
    ) -> list[int]:
        """Runs a kernel of selftest.cu on blocks of 256 threads (`threads` for the cluster tests,
        in clusters of `cluster` blocks, 0 for a plain launch, on `device`, whose
        smem_per_block_optin is the argument's); returns what the first 256 wrote."""
        out = (ctypes.c_int * 256)(*([-7] * 256))
        error = ctypes.create_string_buffer(4096)
        status = self._lib.emu_selftest(
            name.encode(),
            kind,
            arg,
            width,
            SCHEDULES.index(schedule),
            threads,
            cluster,
            device.num_sms,
            device.smem_per_sm,
            smem_per_block_optin,
            int(device.clusters),
            out,
            error,
            len(error),
        )
        if status != 0:
            raise EmulationError(error.value.decode())
        return list(out)

    def launches(self) -> list[Launch]:
        """The launches of the last call."""
        size = self._lib.emu_launches(None, 0) + 1
        text = ctypes.create_string_buffer(size)
        self._lib.emu_launches(text, size)
        launches = []
        for line in text.value.decode().splitlines():
            kernel, where, grid, block, *numbers = line.split("\t")
            launches.append(
                Launch(
                    kernel,
                    where,
                    tuple(map(int, grid.split())),
                    tuple(map(int, block.split())),
                    *map(int, numbers),
                )
            )
        return launches
