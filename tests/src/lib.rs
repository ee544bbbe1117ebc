//! Helpers for the end-to-end tests in `tests/tests/`: locating the built `rampart` binary,
//! temporary directories and prerequisites that are skipped (or, under `CI=true`, failed) when
//! missing.
