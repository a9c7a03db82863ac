"""A run on disk: the checkpoint format (format.py, on the atomic writers of mtbert.files),
its JSON schemas (schema.py), the run folder's lock and healing (runfolder.py), and the
export to transformers and sentence-transformers (export.py)."""
