//! Control-plane access policy: who may send which command-socket requests.
