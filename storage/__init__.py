"""Object storage for every Lookalike unit: S3 through the minio SDK, the embedded S3 server, and
versioned artifacts (models, indexes) that are published whole or not at all.

Only `minio` (no torch) is needed here, so the transformer's image can carry it.
"""
