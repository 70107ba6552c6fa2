//! End-to-end test helpers: arrive with the shim step (issue 5).
