//! The audit trail: hash-chained JSON-lines records of every configuration change, and the
//! reviewer's verifier. Writing a record must never be skipped silently: a mutating request whose
//! record cannot be written fails.
