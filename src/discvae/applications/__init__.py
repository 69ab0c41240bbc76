"""What trained runs are used for: ``codes`` (deterministic codes as ``.npz``), ``retrieval`` (hashing against LSH,
PCAH, ITQ), ``search`` (a faiss index of a collection's codes, queried by Hamming distance) and ``clustering``
(against k-means)."""
