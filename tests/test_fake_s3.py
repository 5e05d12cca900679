"""The S3 backends, against real servers over HTTP."""
from __future__ import annotations

import pytest

from harness.fakes.docker import docker_status
from harness.fakes.s3 import ExternalS3, MinioS3, MotoS3, open_s3, temporary_bucket
from quantlab_chaos.errors import ConfigError, UnreachableError


def test_moto_serves_s3_over_http_with_bucket_helpers() -> None:
    with MotoS3() as server:
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        with temporary_bucket(server) as bucket:
            bucket.put("replay_runs/replay_run_id=r1/manifest.json", '{"stop_reason": "STREAM_END"}')
            bucket.put("audit/date=20260101/part-1-a.jsonl", '{"action": "RUN_START"}\n{"action": "RUN_STOP"}\n')
            assert bucket.list_keys("replay_runs/") == ["replay_runs/replay_run_id=r1/manifest.json"]
            assert bucket.read_json("replay_runs/replay_run_id=r1/manifest.json")["stop_reason"] == "STREAM_END"
            assert [line["action"] for line in bucket.read_lines("audit/date=20260101/part-1-a.jsonl")] == [
                "RUN_START",
                "RUN_STOP",
            ]
            head = bucket.head("replay_runs/replay_run_id=r1/manifest.json")
            assert head is not None and head["ContentLength"] > 0
            assert bucket.head("replay_runs/replay_run_id=missing/manifest.json") is None
            assert set(bucket.snapshot()) == set(bucket.list_keys())
            name = bucket.name
        names = [b["Name"] for b in server.client().list_buckets()["Buckets"]]
        assert name not in names, "temporary_bucket must delete its bucket"


def test_each_environment_gets_its_own_keys() -> None:
    with MotoS3() as first, MotoS3() as second:
        assert first.credentials.access_key != second.credentials.access_key
        assert first.credentials.secret_key not in repr(first.credentials)


def test_buckets_are_separate_per_test() -> None:
    with MotoS3() as server:
        one, two = server.bucket(), server.bucket()
        one.put("k", "v")
        assert two.list_keys() == []
        one.delete()
        two.delete()


def test_url_backend_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUANTLAB_CHAOS_S3_ACCESS_KEY", raising=False)
    with pytest.raises(ConfigError, match="QUANTLAB_CHAOS_S3_ACCESS_KEY"):
        ExternalS3("http://127.0.0.1:9")


def test_url_backend_talks_to_any_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    with MotoS3() as moto:
        monkeypatch.setenv("QUANTLAB_CHAOS_S3_ACCESS_KEY", "any")
        monkeypatch.setenv("QUANTLAB_CHAOS_S3_SECRET_KEY", "any-secret")
        with open_s3("url", moto.endpoint_url) as external:
            bucket = external.bucket()
            bucket.put("x", "y")
            assert bucket.read_bytes("x") == b"y"


def test_url_backend_reports_an_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTLAB_CHAOS_S3_ACCESS_KEY", "any")
    monkeypatch.setenv("QUANTLAB_CHAOS_S3_SECRET_KEY", "any-secret")
    from harness.ports import free_port

    with pytest.raises(UnreachableError, match="does not answer"):
        with open_s3("url", f"http://127.0.0.1:{free_port()}"):
            pass


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="choose one of moto, minio, url"):
        open_s3("ceph")


@pytest.mark.skipif(not docker_status()[0], reason=f"MinIO backend needs Docker: {docker_status()[1]}")
def test_minio_container_backend() -> None:
    with MinioS3() as server, temporary_bucket(server) as bucket:
        bucket.put("a", "b")
        assert bucket.list_keys() == ["a"]


@pytest.mark.skipif(docker_status()[0], reason="Docker is present; the no-Docker error path cannot be shown")
def test_minio_without_docker_says_what_to_do() -> None:
    with pytest.raises(UnreachableError, match="--s3-backend moto"):
        with MinioS3():
            pass
