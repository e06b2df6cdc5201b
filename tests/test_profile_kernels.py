"""The kernel-kind table of benchmarks/profile_kernels.py, on kernel names an H100 profile of our
steps reports (the documented shares of GPU time rest on this mapping)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kind_of():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "profile_kernels", ROOT / "benchmarks" / "profile_kernels.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module.kind_of


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
            "attention",
        ),
        (
            "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0",
            "attention backward",
        ),
        (
            "void cudnn::fusion::compute_dot_do_o<true>(void const*, void const*, void*, void*)",
            "attention backward",
        ),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x64x32", "convolution"),
        (
            "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64",
            "convolution, input gradient",
        ),
        (
            "sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize32x128x32",
            "convolution, weight gradient",
        ),
        # inductor names its fused kernels after every op they absorb, a convolution's bias too
        (
            "triton_poi_fused_clone_convolution_native_group_norm_silu_104",
            "fused elementwise and norms (inductor)",
        ),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        (
            "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata>",
            "optimizer",
        ),
        (
            "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>",
            "copies",
        ),
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::addmm", "matmul"),
        ("Memset (Device)", "other"),
    ],
)
def test_kernel_kinds(kind_of, kernel, kind):
    assert kind_of(kernel) == kind
