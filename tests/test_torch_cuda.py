"""The PyTorch reference on a CUDA GPU decodes what it decodes on the CPU (GPU only)."""

import numpy as np
import pytest
import torch

from melle.checkpoint import load_checkpoint
from melle.generate import generate
from melle.vocoder import HifiganConfig, Generator, numpy_vocoder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch that sees a GPU")]

SAMPLE_IDS = [2 + (7 * i) % 20 for i in range(20)]
MEL_TOLERANCE = 1e-3  # the runtime-vs-reference bound of DESIGN.md


@pytest.mark.parametrize("r", [1, 2])
def test_cuda_decode_equals_cpu(tiny_checkpoint, r):
    cpu = generate(load_checkpoint(tiny_checkpoint(r)), SAMPLE_IDS, seed=0)
    gpu = generate(load_checkpoint(tiny_checkpoint(r), device="cuda"), SAMPLE_IDS, seed=0)
    assert cpu.stopped == gpu.stopped == [True]
    assert gpu.n_groups == cpu.n_groups
    error = np.abs(gpu.mel - cpu.mel).max()
    assert error < MEL_TOLERANCE, f"CUDA vs CPU mel error {error:.2e}"


def test_numpy_vocoder_runs_on_the_generators_device():
    config = HifiganConfig(resblock="1", upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
                           upsample_initial_channel=32, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
                           sampling_rate=16000, num_mels=20, n_fft=64, hop_size=16, win_size=64, fmin=0, fmax=8000)
    torch.manual_seed(0)
    generator = Generator(config).eval()
    mel = np.random.default_rng(0).standard_normal((30, 20)).astype(np.float32)
    on_cpu = numpy_vocoder(generator)(mel)
    on_gpu = numpy_vocoder(generator.to("cuda"))(mel)
    assert on_gpu.shape == on_cpu.shape == (30 * 16,)
    error = np.abs(on_gpu - on_cpu).max()
    assert error < 1e-3 * max(1.0, np.abs(on_cpu).max()), f"CUDA vs CPU waveform error {error:.2e}"
