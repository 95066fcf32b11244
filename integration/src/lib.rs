//! End-to-end test support for tagway and the dev catalog.

pub mod e2e;
