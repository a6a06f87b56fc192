"""Sampling: one batched-branch loop, guidance functions, scheduler choice."""
