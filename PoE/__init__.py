"""Pool of Experts: realtime querying of specialized knowledge in massive neural networks (Kim & Choi, 2021)."""
