"""The server load test, in miniature: it runs, measures every level and checks what it claims to check."""

import json

import pytest

from melle.core.cli import UserError
from melle_bench.serve_load import main


def test_a_small_load_run_serves_every_request_intact_with_and_without_batching(voiced_gqa_engine, tmp_path):
    main(["--engine", str(voiced_gqa_engine), "--levels", "1,3", "--requests", "3", "--max-queue", "2",
          "--max-batch", "1,2", "--disconnects", "4", "--disconnect-rounds", "1", "--time-limit", "400",
          "--out", str(tmp_path)])
    report = json.loads((tmp_path / "serve_load.json").read_text())
    assert [r["text"] for r in report["references"]] == [0, 1, 2]
    assert [mode["max_batch"] for mode in report["modes"]] == [1, 2]
    for mode in report["modes"]:
        assert mode["references_differing"] == 0  # batching changes no request's audio
        solo, crowded = mode["levels"]
        assert solo["ok"] == 3 and solo["errors"] == solo["rate_limited"] == solo["mismatched"] == 0
        # three clients against a queue of two: whoever is refused gets a 429, everyone else their own audio
        assert crowded["requests"] == 3 and crowded["ok"] + crowded["rate_limited"] == 3 and crowded["ok"] >= 2
        assert crowded["errors"] == crowded["mismatched"] == 0
        for level in mode["levels"]:
            assert 0 < level["first_audio_s"]["p50"] <= level["first_audio_s"]["p90"]
            assert level["audio_s_per_s"] > 0 and level["rtf"]["p50"] > 0
            for result in level["results"]:
                if result["status"] == 200:
                    assert result["audio_s"] == next(r["audio_s"] for r in report["references"]
                                                     if r["text"] == result["text"])
        storm = mode["disconnects"]
        assert storm["queue_drained"] and storm["served_after"] and storm["rss_growth_mb"] is not None
        assert sum(storm["outcomes"].values()) == 4
    markdown = (tmp_path / "serve_load.md").read_text()
    assert report["machine"]["cpu"] in markdown and "--max-batch 2: 1 clients" in markdown


def test_batching_needs_a_gqa_engine(voiced_engine, tmp_path):
    with pytest.raises(UserError, match="--attention gqa"):
        main(["--engine", str(voiced_engine), "--max-batch", "1,4", "--out", str(tmp_path)])


@pytest.mark.parametrize("option, words", [(["--levels", "1,x"], "comma-separated"),
                                           (["--levels", "0,2"], "--levels must be at least 1"),
                                           (["--max-batch", "1,y"], "comma-separated"),
                                           (["--requests", "0"], "--requests must be at least 1")])
def test_bad_options_are_usage_errors(voiced_engine, capsys, option, words):
    with pytest.raises(SystemExit) as caught:
        main(["--engine", str(voiced_engine), *option])
    assert caught.value.code == 2 and words in capsys.readouterr().err
