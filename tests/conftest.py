"""Shared fixtures. s3_server: moto's S3 server on 127.0.0.1 for the whole session."""

from __future__ import annotations

import uuid

import pytest

# Distinct dummy credentials, so tests can assert they never leak into reprs, errors or JSON.
TEST_ACCESS_KEY = "AKIALONGREELTESTKEY01"
TEST_SECRET_KEY = "longreel-test-secret-do-not-print"


class S3Server:
    """The running server: `endpoint_url`, a boto3 `client()` for assertions, `create_bucket()`."""

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url
        self._client = None

    def client(self):
        if self._client is None:  # one client for the session: building one costs ~0.3 s
            import boto3

            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url,
                                                          region_name="us-east-1")
        return self._client

    def create_bucket(self, name: str = "") -> str:
        """Create a bucket (a fresh unique name unless given) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def __repr__(self) -> str:
        return f"S3Server({self.endpoint_url!r})"


@pytest.fixture(scope="session")
def s3_server():
    """moto ThreadedMotoServer on 127.0.0.1 (port 0: a free one); boto3's chain finds dummy
    credentials in the environment for the session (Ray workers started later inherit them)."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        env.setenv("AWS_CONFIG_FILE", "/nonexistent/longreel-test-aws-config")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/longreel-test-aws-credentials")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # nothing may reach beyond 127.0.0.1
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield S3Server(endpoint_url=f"http://{host}:{port}")
        finally:
            server.stop()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One cache of random-weight tiny models for the session (model.cache_dir=...): built once."""
    return str(tmp_path_factory.mktemp("model-cache"))
