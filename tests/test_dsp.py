"""ser.dsp: the mel scale and filterbank against librosa, length fixing."""
import numpy as np
import pytest

from ser.dsp import fix_length, mel_band_edges, mel_filterbank


def test_fix_length_centres():
    assert fix_length(np.arange(10.0), 4).tolist() == [3, 4, 5, 6]
    assert fix_length(np.ones(2), 5).tolist() == [0, 1, 1, 0, 0]


@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [(16000, 1024, 64, 20, 8000), (16000, 512, 40, 0, 8000),
                                                      (22050, 2048, 128, 50, 11025)])
def test_mel_filterbank_equals_librosa(sr, n_fft, n_mels, fmin, fmax):
    import librosa

    theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    np.testing.assert_allclose(mel_filterbank(sr, n_fft, n_mels, fmin, fmax), theirs, rtol=1e-5, atol=1e-9)


def test_each_mel_band_peaks_at_its_centre_edge():
    import librosa

    edges = mel_band_edges(64, 20, 8000)
    assert len(edges) == 66 and edges[0] == pytest.approx(20) and edges[-1] == pytest.approx(8000)
    np.testing.assert_allclose(edges, librosa.mel_frequencies(66, fmin=20, fmax=8000), rtol=1e-9)
    bank, fft_hz = mel_filterbank(16000, 4096, 64, 20, 8000), np.linspace(0, 8000, 2049)
    peaks = fft_hz[bank.argmax(axis=1)]
    assert np.all(np.abs(peaks - edges[1:-1]) <= 8000 / 2048)  # within one FFT bin of the centre
