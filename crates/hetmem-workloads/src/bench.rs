//! Bench matrix (stub).
