//! End-to-end test support for tagway and the dev catalog.
#![warn(missing_docs)]

pub mod catalog;
pub mod e2e;
pub mod sandbox;
