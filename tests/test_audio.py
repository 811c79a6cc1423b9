"""Mel features (numpy == torch == librosa filterbank) and audio file io."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from melle.core.audio import PRESETS, AudioError, get_preset, load_wav, mel_filterbank, mel_spectrogram, save_audio
from melle.core.fileio import atomic_dir
from melle.mel_torch import mel_spectrogram_torch


def chirp(sample_rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    """A linear sweep from 100 Hz to near Nyquist: touches every mel band and the log floor."""
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    sweep = 100 * t + (sample_rate / 2 - 200) / (2 * seconds) * t**2
    return (amplitude * np.sin(2 * np.pi * sweep)).astype(np.float32)


def test_audio_imports_without_torch():
    code = "import sys, melle.core.audio; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="hifigan-22k"):
        get_preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_numpy_mel_equals_torch_mel(name):
    preset = get_preset(name)
    rng = np.random.default_rng(0)
    wavs = np.stack([chirp(preset.sample_rate, 1.0),
                     (0.1 * rng.standard_normal(preset.sample_rate)).astype(np.float32)])
    batched = mel_spectrogram_torch(torch.from_numpy(wavs), preset).numpy()
    assert batched.dtype == np.float32 and batched.shape == (2, preset.sample_rate // 256, 80)
    for wav, got in zip(wavs, batched):
        expected = mel_spectrogram(wav, preset)
        assert expected.dtype == np.float32
        assert np.abs(expected - got).max() < 1e-4
    assert mel_spectrogram_torch(torch.from_numpy(wavs[0]), preset).shape == (1, *batched.shape[1:])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_filterbank_equals_librosa(name):
    librosa = pytest.importorskip("librosa", reason="librosa (a dev dependency) is not installed")
    p = get_preset(name)
    expected = librosa.filters.mel(sr=p.sample_rate, n_fft=p.n_fft, n_mels=p.n_mels, fmin=p.fmin, fmax=p.fmax)
    np.testing.assert_allclose(mel_filterbank(p), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("n_samples", [385, 1000, 16000, 22050 + 255])
def test_frame_count_is_length_over_hop(name, n_samples):
    preset = get_preset(name)
    wav = chirp(preset.sample_rate, 2.0)[:n_samples]
    assert mel_spectrogram(wav, preset).shape == (n_samples // preset.hop_length, preset.n_mels)


def test_log_floor_of_silence():
    for preset, floor in ((get_preset("paper-16k"), -5.0), (get_preset("hifigan-22k"), np.log(1e-5))):
        mel = mel_spectrogram(np.zeros(4096, np.float32), preset)
        np.testing.assert_allclose(mel, floor, rtol=1e-6)


def test_stereo_is_downmixed_with_a_warning(tmp_path):
    left = chirp(16000, 0.5)
    sf.write(tmp_path / "stereo.wav", np.stack([left, np.zeros_like(left)], axis=1), 16000, subtype="FLOAT")
    with pytest.warns(UserWarning, match="downmixed"):
        wav = load_wav(tmp_path / "stereo.wav", 16000)
    np.testing.assert_allclose(wav, left / 2, atol=1e-6)


def test_other_rate_is_resampled(tmp_path):
    sf.write(tmp_path / "a.wav", chirp(44100, 1.5, 0.3), 44100)
    wav = load_wav(tmp_path / "a.wav", 22050)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - int(1.5 * 22050)) <= 1


def test_unusable_audio_raises_audio_error(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match="silent"):
        load_wav(tmp_path / "silent.wav", 16000)
    sf.write(tmp_path / "short.wav", chirp(16000, 0.5), 16000)
    with pytest.raises(AudioError, match="shorter than"):
        load_wav(tmp_path / "short.wav", 16000, min_seconds=1.0)
    with pytest.raises(AudioError, match="does not exist"):
        load_wav(tmp_path / "missing.wav", 16000)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="cannot read"):
        load_wav(tmp_path / "junk.wav", 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="no samples"):
        load_wav(tmp_path / "empty.wav", 16000)


def test_save_wav_round_trip(tmp_path):
    wav = chirp(22050, 0.5)
    save_audio(tmp_path / "out" / "a.wav", wav, 22050)
    info = sf.info(tmp_path / "out" / "a.wav")
    assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
    np.testing.assert_allclose(load_wav(tmp_path / "out" / "a.wav", 22050), wav, atol=1 / 2**15)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.wav"], "no temp file left behind"


@pytest.mark.parametrize("suffix, kind", [(".flac", "FLAC"), (".ogg", "OGG"), (".mp3", "MP3"), (".WAV", "WAV")])
def test_save_audio_writes_the_format_its_extension_names(tmp_path, suffix, kind):
    wav = chirp(22050, 0.5)
    save_audio(tmp_path / f"a{suffix}", wav, 22050)
    info = sf.info(tmp_path / f"a{suffix}")
    assert (info.format, info.samplerate, info.channels) == (kind, 22050, 1)
    back = load_wav(tmp_path / f"a{suffix}", 22050)
    # Lossy codecs shift and pad: compare loudness, not samples.
    assert abs(np.sqrt(np.mean(back ** 2)) - np.sqrt(np.mean(wav ** 2))) < 0.1 * np.sqrt(np.mean(wav ** 2))


def test_save_audio_refuses_an_extension_it_cannot_write(tmp_path):
    with pytest.raises(AudioError, match=r"\.m4a.*\.wav, \.flac, \.ogg, \.mp3"):
        save_audio(tmp_path / "a.m4a", chirp(22050, 0.1), 22050)
    assert not any(tmp_path.iterdir())


def test_outputs_get_the_permissions_the_umask_asks_for(tmp_path):
    previous = os.umask(0o022)
    try:
        save_audio(tmp_path / "a.wav", chirp(22050, 0.1), 22050)
        with atomic_dir(tmp_path / "engine") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.wav").stat().st_mode) == 0o644  # was 0600 from mkstemp
    assert stat.S_IMODE((tmp_path / "engine").stat().st_mode) == 0o755  # was 0700 from mkdtemp
