"""Retrieval-augmented answers from your own files.

`extract.py` (files -> text blocks under their headings), `chunk.py` (blocks -> overlapping chunks
that follow the structure), `embed.py` (dense embedders by name), `store.py` (a collection: SQLite
with FTS5 and the vectors, the vector store), `retrieve.py` (BM25, dense, reciprocal rank fusion,
re-ranking by the assistant), `answer.py` (the prompt with delimited documents, citations; the one
entry point for chat and the API), `command.py` and `evaluate.py` (`chatforge rag ...`).
Nothing here imports torch until a model or the MiniLM embedder is used."""
