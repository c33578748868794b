"""The aggregation server: Flower ServerApp and strategy, DP and secure aggregation, run store, publishing, operator API (see docs/design.md)."""
