"""The stage table and the stage child's protocol (``colmap_pipeline/protocol.py``)."""
from __future__ import annotations

import json

import pytest

from colmap_pipeline.core import cli
from colmap_pipeline.protocol import (
    EXIT_STAGE_CRASH,
    EXIT_STAGE_PIPELINE_ERROR,
    STAGES,
    DoneEvent,
    ErrorEvent,
    ProgressEvent,
    overall_progress,
    parse_event,
)


def test_events_parse_into_their_types():
    assert parse_event(b'{"event":"progress","stage":"frames","fraction":0.25,"message":"m"}\n'
                       ) == ProgressEvent(0.25, "m")
    assert parse_event('{"event":"done","stage":"frames","summary":{"n":3}}') == DoneEvent(
        {"n": 3})
    err = {"event": "error", "stage": "mapping", "code": "reconstruction_failed",
           "message": "No model.", "hint": "Film more.", "details": {"verified_pairs": 4}}
    assert parse_event(json.dumps(err)) == ErrorEvent("reconstruction_failed", "No model.",
                                                      "Film more.", {"verified_pairs": 4})


@pytest.mark.parametrize("line", [b"", b"glog noise on stdout", b"[1, 2]", b'{"event": "x"}',
                                  b'{"no_event": 1}', b"\xff\xfe"])
def test_lines_that_are_not_events_are_ignored(line):
    assert parse_event(line) is None


def test_malformed_fields_get_safe_defaults():
    assert parse_event('{"event":"progress","fraction":"half"}') == ProgressEvent(0.0, "")
    assert parse_event('{"event":"done","summary":null}') == DoneEvent({})
    assert parse_event('{"event":"error","details":[1]}') == ErrorEvent("pipeline_error", None,
                                                                        None, {})


def test_the_child_uses_the_shared_exit_statuses():
    assert (cli.EXIT_STAGE_PIPELINE_ERROR, cli.EXIT_STAGE_CRASH) == (
        EXIT_STAGE_PIPELINE_ERROR, EXIT_STAGE_CRASH) == (3, 4)


def test_overall_progress_is_monotonic_and_ends_at_100():
    bar = [overall_progress(s, f) for s in STAGES for f in (0.0, 0.5, 1.0)]
    assert bar == sorted(bar) and bar[0] == 0 and bar[-1] == 100
    with pytest.raises(KeyError):
        overall_progress("nope", 0.0)
