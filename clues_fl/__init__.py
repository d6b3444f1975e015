"""clues-fl: federated LLM fine-tuning on Flower that drops low-quality private data by
gradient alignment with a public anchor set (CLUES, Quad)."""
