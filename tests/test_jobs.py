"""colmap_pipeline.jobs: the status enum, the transition table and the rules every store shares
(what an intent writes, what a new job holds)."""
from __future__ import annotations

import dataclasses

import pytest

from colmap_pipeline import jobs
from colmap_pipeline.jobs import (
    TERMINAL,
    TRANSITIONS,
    WITH_FILES,
    Intent,
    Job,
    JobStatus,
    Stamp,
    allowed,
    new_job_record,
    planned_changes,
)

P, R, C, F, X, E, D = (JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.COMPLETED,
                       JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED,
                       JobStatus.DELETED)

#: the table written out by hand: intent -> (sources, target)
EXPECTED = {
    Intent.CLAIM: ({P}, R),
    Intent.CANCEL: ({P, R}, X),
    Intent.RETRY: ({F, X}, P),
    Intent.REQUEUE: ({R}, P),
    Intent.COMPLETE: ({R}, C),
    Intent.FAIL: ({R}, F),
    Intent.EXPIRE: ({C, F, X}, E),
    Intent.DELETE: ({P, R, C, F, X, E}, D),
}


def test_statuses_and_intents_are_the_documented_strings():
    assert [s.value for s in JobStatus] == [
        "pending", "processing", "completed", "failed", "cancelled", "expired", "deleted"]
    assert {i.value for i in Intent} == {
        "claim", "cancel", "retry", "requeue", "complete", "fail", "expire", "delete"}
    assert TERMINAL == {C, F, X}
    assert WITH_FILES == {P, R, C, F, X}


@pytest.mark.parametrize("intent", list(Intent))
def test_every_intent_has_its_sources_and_target(intent):
    sources, target = EXPECTED[intent]
    assert TRANSITIONS[intent].sources == sources
    assert TRANSITIONS[intent].target == target
    assert target not in sources  # every transition changes the status


@pytest.mark.parametrize("intent", list(Intent))
@pytest.mark.parametrize("status", list(JobStatus))
def test_allowed_matches_the_table(intent, status):
    assert allowed(intent, status) is (status in EXPECTED[intent][0])
    assert allowed(intent, status.value) is (status in EXPECTED[intent][0])


def test_deleted_is_final_and_expired_only_deleted():
    assert not any(allowed(i, D) for i in Intent)
    assert [i for i in Intent if allowed(i, E)] == [Intent.DELETE]
    assert set(TRANSITIONS) == set(Intent)


def test_retry_clears_the_previous_attempt():
    sets = TRANSITIONS[Intent.RETRY].sets
    for col in ("error_code", "error_message", "error_hint", "error_details", "results",
                "finished_at"):
        assert col in sets and sets[col] is None
    assert (sets["progress"], sets["current_stage"]) == (0, "Queued")


def test_stamps_of_the_table():
    assert TRANSITIONS[Intent.CLAIM].sets["attempt"] is Stamp.INCREMENT
    assert TRANSITIONS[Intent.CLAIM].sets["started_at"] is Stamp.NOW
    for intent in (Intent.CANCEL, Intent.COMPLETE, Intent.FAIL):
        assert TRANSITIONS[intent].sets["finished_at"] is Stamp.NOW
    assert TRANSITIONS[Intent.DELETE].sets["finished_at"] is Stamp.NOW_IF_UNSET
    assert TRANSITIONS[Intent.DELETE].sets["idempotency_key"] is None
    with pytest.raises(TypeError):
        TRANSITIONS[Intent.CANCEL].sets["message"] = "x"  # type: ignore[index]  # read-only


def test_expire_removes_the_email_address_with_the_files():
    """Issue 13: retention's expiry clears ``user_email`` (personal data) and nothing else of
    the caller's: the owner stays, so the expired job is still listed for its key."""
    sets = TRANSITIONS[Intent.EXPIRE].sets
    assert sets == {"user_email": None, "message": "Files removed by retention"}
    assert planned_changes(Intent.EXPIRE, {})["user_email"] is None


def test_planned_changes_merges_defaults_and_caller_fields():
    ch = planned_changes(Intent.CANCEL, {"message": "by the operator"})
    assert ch == {"finished_at": Stamp.NOW, "message": "by the operator",
                  "status": "cancelled", "updated_at": Stamp.NOW}
    ch = planned_changes(Intent.FAIL, {"error_code": "too_blurry", "finished_at": "t"})
    assert (ch["status"], ch["error_code"], ch["finished_at"]) == ("failed", "too_blurry", "t")
    assert planned_changes("retry", {})["status"] == "pending"  # type: ignore[arg-type]
    for bad in ({"status": "completed"}, {"job_id": "x"}, {"created_at": "t"},
                {"updated_at": "t"}, {"owner": "mallory"}, {"nope": 1}):
        with pytest.raises(ValueError, match="cannot set"):
            planned_changes(Intent.CANCEL, bad)
    with pytest.raises(ValueError):
        planned_changes("bogus", {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        planned_changes(Intent.COMPLETE, {"attempts": []}, with_attempt_record=True)


def test_columns_match_the_job_record():
    assert jobs.COLUMNS == tuple(f.name for f in dataclasses.fields(Job))
    assert jobs.COLUMNS[-1] == "webhook_url"  # the last column added (schema version 6)
    assert {"owner", "webhook_url"} <= jobs.CREATE_ALLOWED
    assert jobs.JSON_COLUMNS == {"video_info", "results", "attempts", "error_details"}
    assert jobs.SETTABLE == set(jobs.COLUMNS) - {"job_id", "status", "created_at", "updated_at",
                                                 "owner"}


def test_new_job_record():
    job = {"job_id": "j", "scan_id": "s", "project_id": "p", "scan_name": "n",
           "quality": "low", "input_path": "/x", "input_bytes": 3, "input_sha256": "h",
           "request_fingerprint": "f"}
    row = new_job_record(job, "2026-01-01T00:00:00.000000+00:00")
    assert set(row) == set(jobs.COLUMNS)
    assert (row["status"], row["progress"], row["current_stage"], row["message"]) == (
        "pending", 0, "Queued", "Waiting for a free worker")
    assert row["created_at"] == row["updated_at"] == "2026-01-01T00:00:00.000000+00:00"
    assert (row["attempt"], row["attempts"], row["request_fingerprint"]) == (0, [], "f")
    assert row["owner"] is None  # authentication off
    assert new_job_record({**job, "owner": "alice"}, "t")["owner"] == "alice"
    with pytest.raises(ValueError, match="input_sha256"):
        new_job_record({k: v for k, v in job.items() if k != "input_sha256"}, "t")
    with pytest.raises(ValueError, match="progress"):
        new_job_record({**job, "progress": 50}, "t")


def test_encode_json_dumps_pydantic_models():
    from colmap_pipeline.results import Artifact
    art = Artifact(name="sparse.ply", bytes=10, media_type="application/octet-stream",
                   sha256="ab")
    text = jobs.encode_json({"artifacts": [art]})
    assert '"name":"sparse.ply"' in text and '"bytes":10' in text
    with pytest.raises(TypeError):
        jobs.encode_json({"x": object()})


def test_utcnow_is_sortable_iso_utc():
    a, b = jobs.utcnow(), jobs.utcnow()
    assert a.endswith("+00:00") and len(a) == len("2026-01-01T00:00:00.000000+00:00")
    assert a <= b
