"""Catalogs: the line format (`format`), rows and listings with their layout in the store and their
validation (`rows`), and the importers (`importers`: a folder, Fashion-MNIST; `listing_csv`: a folder's
listings CSV; `emoji`: the colour development catalog). Training, indexing and serving all read catalogs
from here. Imports only `lookalike.core`.
"""
