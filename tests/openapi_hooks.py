"""schemathesis hooks for tests/test_openapi_nodes.py (loaded by SCHEMATHESIS_HOOKS): a tus chunk's
body, ``application/offset+octet-stream``, is sent as the bytes they are."""

import schemathesis

schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
