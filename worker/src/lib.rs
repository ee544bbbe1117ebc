//! The worker: a single-threaded event loop proxying client connections to backends, entered
//! only after the jail holds. It receives everything it needs over its channel and never opens
//! a file, binds a port or talks to the audit trail.
