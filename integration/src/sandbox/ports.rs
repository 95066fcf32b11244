//! Choosing listen addresses: the defaults when free, a free port when a default is taken (with a
//! note), an error naming the flag when an address the user asked for is taken.

use std::net::{SocketAddr, TcpListener as StdListener};

use tokio::net::TcpListener;

use super::SandboxError;

/// A listen address asked for on the command line, or a default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requested {
    /// The address (port 0: any free port).
    pub addr: SocketAddr,
    /// The user gave it (an error when taken) rather than it being a default (replaced by a free
    /// port when taken).
    pub explicit: bool,
}

impl Requested {
    /// A default address.
    pub fn default_addr(addr: SocketAddr) -> Self {
        Requested {
            addr,
            explicit: false,
        }
    }

    /// An address the user asked for.
    pub fn explicit(addr: SocketAddr) -> Self {
        Requested {
            addr,
            explicit: true,
        }
    }
}

/// Binds the dev catalog's listener (kept: the catalog serves on it).
pub async fn bind_catalog(
    req: Requested,
    notes: &mut Vec<String>,
) -> Result<TcpListener, SandboxError> {
    let std = bind_or_fallback("dev catalog", "--catalog-addr", req, false, notes)?;
    std.set_nonblocking(true)
        .map_err(|source| SandboxError::Bind {
            what: "dev catalog",
            addr: req.addr,
            source,
        })?;
    TcpListener::from_std(std).map_err(|source| SandboxError::Bind {
        what: "dev catalog",
        addr: req.addr,
        source,
    })
}

/// Reserves an address for a listener the gateway binds: the returned listener holds the port
/// until it is dropped (right before the gateway starts), so two reservations never pick the
/// same free port.
pub fn reserve(
    what: &'static str,
    flag: &'static str,
    req: Requested,
    free_ports: bool,
    notes: &mut Vec<String>,
) -> Result<StdListener, SandboxError> {
    bind_or_fallback(what, flag, req, free_ports, notes)
}

fn bind_or_fallback(
    what: &'static str,
    flag: &'static str,
    req: Requested,
    free_ports: bool,
    notes: &mut Vec<String>,
) -> Result<StdListener, SandboxError> {
    let any = SocketAddr::new(req.addr.ip(), 0);
    let bind = |addr: SocketAddr| {
        StdListener::bind(addr).map_err(|source| SandboxError::Bind { what, addr, source })
    };
    if req.addr.port() == 0 || (free_ports && !req.explicit) {
        return bind(any);
    }
    match StdListener::bind(req.addr) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if req.explicit {
                return Err(SandboxError::PortTaken {
                    what,
                    addr: req.addr,
                    flag,
                });
            }
            let l = bind(any)?;
            let got = l.local_addr().map_err(|source| SandboxError::Bind {
                what,
                addr: any,
                source,
            })?;
            notes.push(format!(
                "{} is in use, so the {what} listens on {got} instead (choose with {flag})",
                req.addr
            ));
            Ok(l)
        }
        Err(source) => Err(SandboxError::Bind {
            what,
            addr: req.addr,
            source,
        }),
    }
}

/// The local address of a reserved listener.
pub fn local_addr(what: &'static str, l: &StdListener) -> Result<SocketAddr, SandboxError> {
    l.local_addr().map_err(|source| SandboxError::Bind {
        what,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_default_falls_back_to_a_free_port_with_a_note() {
        let taken = StdListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let mut notes = Vec::new();
        let l = reserve(
            "admin API",
            "--admin-addr",
            Requested::default_addr(addr),
            false,
            &mut notes,
        )
        .expect("falls back");
        assert_ne!(l.local_addr().expect("addr"), addr);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains(&addr.to_string()), "{}", notes[0]);
        assert!(notes[0].contains("--admin-addr"), "{}", notes[0]);
    }

    #[test]
    fn a_taken_explicit_address_is_an_error_naming_the_flag() {
        let taken = StdListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = reserve(
            "dev catalog",
            "--catalog-addr",
            Requested::explicit(addr),
            true,
            &mut Vec::new(),
        )
        .expect_err("taken");
        let text = err.to_string();
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(text.contains("--catalog-addr 127.0.0.1:0"), "{text}");
    }

    #[test]
    fn free_ports_replace_defaults_and_port_zero_is_any_port() {
        let mut notes = Vec::new();
        let a = reserve(
            "entry point",
            "--free-ports",
            Requested::default_addr("127.0.0.1:1".parse().expect("literal")),
            true,
            &mut notes,
        )
        .expect("free");
        assert_ne!(a.local_addr().expect("addr").port(), 1);
        let b = reserve(
            "entry point",
            "--free-ports",
            Requested::explicit("127.0.0.1:0".parse().expect("literal")),
            false,
            &mut notes,
        )
        .expect("free");
        assert_ne!(b.local_addr().expect("addr").port(), 0);
        assert!(notes.is_empty());
    }

    #[tokio::test]
    async fn the_catalog_listener_is_bound_and_kept() {
        let l = bind_catalog(
            Requested::explicit("127.0.0.1:0".parse().expect("literal")),
            &mut Vec::new(),
        )
        .await
        .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        c.expect("connects");
        s.expect("accepts");
    }
}
