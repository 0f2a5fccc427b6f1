"""What differs between CPU, GPU and TPU, decided here; the rest of the code asks.

- the attention kernel that `attention="auto"` means on each platform, and the experts'
  grouped matmul (`expert_kernel="auto"`);
- the form of a product with a quantized weight, and how int4 weights are held (CPU: as int8);
- whether decoding runs the layer stack as one scan over stacked weights or as a block per
  layer over an array per layer (CPU: per layer);
- restarting a script with glibc's malloc on huge pages (for XLA:CPU).

What each buys, measured: docs/DESIGN.md, "CPU specifics", and BENCHMARKS.md.

JAX is imported by the functions that ask it, not at the top, so that a script can restart
itself (restart_with_huge_pages) before JAX has loaded.
"""

from __future__ import annotations

import os
import platform
import sys


def target_platform() -> str:
    """The platform being compiled for: the mesh's under a mesh context, else the default backend."""
    import jax

    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def attention_kernel(requested: str) -> str:
    """The self-attention kernel of full sequences: `requested`, or for "auto" the Pallas splash
    kernel on TPU, jax.nn.dot_product_attention (cuDNN) on GPU and the blocked XLA kernel elsewhere."""
    if requested != "auto":
        return requested
    return {"gpu": "dot_product", "tpu": "splash"}.get(target_platform(), "xla")


def expert_kernel(requested: str) -> str:
    """The grouped matmul of the experts (model/moe.py): `requested`, or for "auto" ragged_dot on
    TPU, whose XLA implements it as one, and the scan over tiles elsewhere."""
    if requested != "auto":
        return requested
    return "ragged_dot" if target_platform() == "tpu" else "tiles"


def quantized_product() -> str:
    """How a quantized weight meets its input (model/quantize.py product): on CPU a block of
    rows dequantized at a time, which XLA:CPU runs several times faster than dequantizing the whole
    weight before its dot (BENCHMARKS.md, "Low-bit weights"); on TPU and GPU the integers
    straight into the matmul, a group of inputs at a time, the scales applied to its output."""
    return "row_blocks" if target_platform() == "cpu" else "dequantize"


def int4_as_int8(platform_name: str) -> bool:
    """Whether int4 weights enter the programs as int8, the same values (quantize.held_for):
    XLA:CPU holds int4 unpacked, a byte each as int8, converts it to floats several times slower than
    int8, and jax refuses such an array sharded over a mesh to a program compiled ahead of
    time for int4's packed layout."""
    return platform_name == "cpu"


def decode_platform(mesh=None) -> str:
    """The platform a decode loop runs on: the mesh's devices', else the default backend's."""
    import jax

    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def decode_per_layer(platform_name: str) -> bool:
    """Whether decoding runs a block per layer over an array per layer (transformer.unstack_layers)
    instead of a scan over the stacked weights. On CPU, a scan copies each layer's weights out
    of the stack before every product; on TPU, the per-layer program compiled slower and held
    more prefill temporaries for no measured gain."""
    return platform_name == "cpu"


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_page_tunables(environ=os.environ) -> str | None:
    """GLIBC_TUNABLES with glibc.malloc.hugetlb=1 added; None where GLIBC_TUNABLES already says
    either way (glibc.malloc.hugetlb=0 keeps 4 KB pages) or the C library is not glibc."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or platform.libc_ver()[0] != "glibc":
        return None
    return ":".join(filter(None, [tunables, HUGE_PAGES]))


def restart_with_huge_pages() -> None:
    """Restarts this process (same pid, command line and environment) with glibc's malloc putting
    its large blocks on transparent huge pages. Call it first, from a script's __main__.

    XLA:CPU allocates its large outputs afresh on every call, and glibc maps each block over
    32 MB fresh from the kernel, which faults it in 4 KB at a time."""
    tunables = huge_page_tunables()
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})
