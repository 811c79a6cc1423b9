"""benchmarks/streaming.py: runs end to end on a tiny engine and reports what it measured."""

import json

import numpy as np

from melle_bench.streaming import main, sentence_audio
from melle_runtime.synthesizer import AudioChunk


def test_streaming_benchmark_reports_both_modes(voiced_engine, tmp_path):
    main(["--engine", str(voiced_engine), "--trials", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "streaming.json").read_text())
    for text in ("sentence", "paragraphs"):
        result = report["timing"][text]
        whole, stream = result["whole"]["median"], result["stream"]["median"]
        assert result["same_length"] and result["stream_vs_whole_max_abs"] < 1e-4
        assert whole["audio_s"] == stream["audio_s"] > 0
        assert whole["first_audio_s"] == whole["total_s"]  # a whole synthesis plays when all is done
        assert 0 < stream["first_audio_s"] <= stream["gapless_start_s"] <= stream["total_s"]
        assert stream["peak_rss_mb"] > 50 and stream["chunks"] > (text == "paragraphs") * 10
    markdown = (tmp_path / "streaming.md").read_text()
    assert "| paragraphs (257 words) | stream |" in markdown and report["machine"]["cpu"] in markdown


def test_sentence_audio_groups_chunks_by_piece_and_drops_the_pause():
    chunks = [AudioChunk(np.ones(3, np.float32), 10, 0), AudioChunk(np.full(2, 0.5, np.float32), 10, 0),
              AudioChunk(np.zeros(4, np.float32), 10, 0), AudioChunk(np.array([0, 2, 0], np.float32), 10, 1)]
    first, second = sentence_audio(chunks)
    np.testing.assert_array_equal(first, [1, 1, 1, 0.5, 0.5])
    np.testing.assert_array_equal(second, [0, 2])  # leading silence is speech timing, kept
