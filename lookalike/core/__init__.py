"""The torch-free core every Lookalike unit imports: the error family and its one status table
(`errors`), settings read from the environment (`settings`), S3 through the minio SDK (`s3`), the
embedded S3 server (`store_server`), versioned artifacts (`artifacts`), the model and index cards
(`model_card`, `index_card`), photo decoding (`decoding`) and preprocessing (`preprocessing`).

Only minio, Pillow and numpy are needed here, so the transformer's image (no torch) carries it whole.
It imports nothing else of the project.
"""
