//! End-to-end test support for tagway and the dev catalog.
#![warn(missing_docs)]

pub mod catalog;
pub mod sandbox;
