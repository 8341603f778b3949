"""Files: faithful image decode / encode, header checks before decoding, atomic writes, and store URIs
(``s3://``, ``gs://``) beside local paths. Knows nothing about models."""
