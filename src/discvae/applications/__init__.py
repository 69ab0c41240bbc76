"""What trained runs are used for: ``codes`` (deterministic codes as ``.npz``), ``retrieval`` (hashing against LSH,
PCAH, ITQ) and ``clustering`` (against k-means)."""
