"""Reading the labeller's inputs: what a header may claim, each file's windows and features."""
from conftest import write_tone
from ser.audio import AudioFile
from ser.labeller.reading import header_problem
from ser.labeller.settings import Settings


def test_a_long_mp3_is_refused_by_its_decoder_not_its_name(tmp_path):
    """libsndfile reads by content: an MP3 called .wav is still read by the MP3 decoder, which is
    not exact in parts, so it too is refused when longer than one window."""
    settings = Settings(segment_s=6.0, hop_s=3.0)
    long_one = write_tone(tmp_path / "call.wav", seconds=8.0, sr=44100, subtype="MPEG_LAYER_III", format="MP3")
    short_one = write_tone(tmp_path / "short.wav", seconds=2.0, sr=44100, subtype="MPEG_LAYER_III", format="MP3")
    with AudioFile(long_one) as audio:
        assert audio.format == "MP3"
        problem = header_problem(audio, long_one.stat().st_size, settings)
    assert "not read here" in problem and "ffmpeg -i in.wav out.wav" in problem
    with AudioFile(short_one) as audio:
        assert header_problem(audio, short_one.stat().st_size, settings) is None
