"""Test helpers, one module per kind: tiny models (models), exports (export), the reference oracle (oracle),
the CLI runner (cli), training photos (train), an S3 server (s3), a headless browser (browser)."""
