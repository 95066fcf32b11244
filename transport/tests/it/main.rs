//! Integration tests of tagway-transport: real sockets on 127.0.0.1, rcgen certificates, rustls
//! backends.

mod dial;
mod files_identity;
mod proxy;
mod spiffe;
mod support;
mod tls;
mod workload_api;
