//! End-to-end test support for tagway and the dev catalog.
