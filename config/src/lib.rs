//! tagway's configuration model.
//!
//! Static configuration (entry points, providers, the default servers transport, admin, logging)
//! and dynamic configuration (TCP routers, services, servers transports, middlewares, TLS
//! certificates), the file formats that carry them, the tag decoder and validation.
