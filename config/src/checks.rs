//! Value checks shared by static loading and dynamic validation.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::dynamic::ServersTransport;
use crate::tls::{ClientCertificate, FileOrContent};

/// Checks a `host:port` address (`10.0.0.1:80`, `db.service:5432`, `[::1]:80`); with
/// `allow_empty_host`, `:80` too (entry points). Returns why it is invalid.
pub fn check_address(addr: &str, allow_empty_host: bool) -> Result<(), String> {
    let example =
        "write host:port, e.g. `10.0.0.1:8080` or `db.example.com:5432` (no scheme, no path)";
    if addr.trim().is_empty() {
        return Err(format!("the address is empty: {example}"));
    }
    if addr.contains("://") {
        return Err(format!(
            "`{addr}` has a scheme: tagway dials TCP addresses; {example}"
        ));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("`{addr}` has no port: {example}"));
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{addr}` has a non-numeric port `{port}`: {example}"
        ));
    }
    match port.parse::<u32>() {
        Ok(p) if p <= 65535 => {}
        _ => return Err(format!("`{addr}`: port {port} is out of range (0-65535)")),
    }
    if host.is_empty() {
        return if allow_empty_host {
            Ok(())
        } else {
            Err(format!("`{addr}` has no host: {example}"))
        };
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(ip) = inner.strip_suffix(']') else {
            return Err(format!("`{addr}`: unbalanced `[` in the host"));
        };
        return ip
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("`{addr}`: `{ip}` is not an IPv6 address"));
    }
    if host.contains(':') {
        return Err(format!(
            "`{addr}`: write IPv6 addresses in brackets, e.g. `[::1]:8080`"
        ));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let valid_name = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid_name {
        Ok(())
    } else {
        Err(format!(
            "`{addr}`: `{host}` is neither an IP address nor a host name: {example}"
        ))
    }
}

/// Parses an IP (`10.0.0.1`, a /32 or /128) or a CIDR (`10.0.0.0/8`).
pub fn parse_ip_or_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net);
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "`{s}` is neither an IP address nor a CIDR range (e.g. `10.0.0.0/8`, `192.168.1.7`, `fd00::/8`)"
    ))
}

/// A problem found in a servers transport: the key (relative to the transport) and why.
pub(crate) struct TransportProblem {
    pub key: &'static str,
    pub message: String,
}

fn file_missing(f: &FileOrContent) -> Option<String> {
    let p = f.path()?;
    if p.exists() {
        None
    } else {
        Some(p.display().to_string())
    }
}

/// Checks a servers transport's values and conflicts.
pub(crate) fn check_transport(t: &ServersTransport) -> Vec<TransportProblem> {
    let mut out = Vec::new();
    let mut push = |key, message: String| out.push(TransportProblem { key, message });
    if t.dial_timeout.is_negative() {
        push(
            "dialTimeout",
            format!(
                "dialTimeout {} is negative: use 0 for no timeout, or a positive duration",
                t.dial_timeout
            ),
        );
    }
    if let Some(pp) = &t.proxy_protocol
        && pp.version != 1
        && pp.version != 2
    {
        push(
            "proxyProtocol.version",
            format!(
                "PROXY protocol version {} does not exist: use 1 or 2",
                pp.version
            ),
        );
    }
    if let Some(sp) = &t.spiffe {
        for id in &sp.ids {
            if !id.starts_with("spiffe://") || id.len() <= "spiffe://".len() {
                push(
                    "spiffe.ids",
                    format!("`{id}` is not a SPIFFE ID: write `spiffe://<trust-domain>/<path>`"),
                );
            }
        }
        if let Some(td) = &sp.trust_domain
            && (td.contains('/') || td.is_empty())
        {
            push(
                "spiffe.trustDomain",
                format!(
                    "`{td}` is not a trust domain: write the bare domain, e.g. `example.org` (no `spiffe://`, no path)"
                ),
            );
        }
    }
    if let Some(tls) = &t.tls {
        if !tls.certificates.is_empty() && t.spiffe.is_some() {
            push(
                "tls.certificates",
                "`tls.certificates` cannot be used with `spiffe`: a transport with `spiffe` presents the gateway's SPIFFE SVID as its client certificate, so static client certificates cannot also be presented; remove `tls.certificates` (the SVID comes from `providers.spiffe`), or remove `spiffe` to present these certificates with regular TLS verification".to_owned(),
            );
        }
        if tls.insecure_skip_verify && (tls.peer_cert_uri.is_some() || t.spiffe.is_some()) {
            let what = match (tls.peer_cert_uri.is_some(), t.spiffe.is_some()) {
                (true, true) => "`tls.peerCertURI` and `spiffe`",
                (true, false) => "`tls.peerCertURI`",
                _ => "`spiffe`",
            };
            push(
                "tls.insecureSkipVerify",
                format!(
                    "`insecureSkipVerify = true` skips the verification of the server's certificate that {what} rely on, so the server's identity would never be checked; remove `insecureSkipVerify`"
                ),
            );
        }
        if tls.peer_cert_uri.is_some() && t.spiffe.is_some() {
            push(
                "tls.peerCertURI",
                "`tls.peerCertURI` cannot be used with `spiffe`: both check the server's URI SAN; with spiffe, list the allowed IDs in `spiffe.ids`".to_owned(),
            );
        }
        if tls.server_name.as_deref().is_none_or(str::is_empty)
            && tls.peer_cert_uri.is_none()
            && t.spiffe.is_none()
            && !tls.insecure_skip_verify
        {
            push(
                "tls",
                "TLS is enabled but nothing says which identity the server's certificate must have: set `tls.serverName` (the name to verify), `tls.peerCertURI` (a URI SAN) or a `spiffe` section, or `insecureSkipVerify = true` to skip verification".to_owned(),
            );
        }
        if let Some(uri) = &tls.peer_cert_uri
            && uri.trim().is_empty()
        {
            push("tls.peerCertURI", "`peerCertURI` is empty".to_owned());
        }
        for c in &tls.certificates {
            let missing: Vec<String> = match c {
                ClientCertificate::Bundle(f) => file_missing(f).into_iter().collect(),
                ClientCertificate::Pair {
                    cert_file,
                    key_file,
                } => file_missing(cert_file)
                    .into_iter()
                    .chain(file_missing(key_file))
                    .collect(),
            };
            for m in missing {
                push(
                    "tls.certificates",
                    format!("certificate file `{m}` does not exist"),
                );
            }
        }
        for ca in &tls.root_cas {
            if let Some(m) = file_missing(ca) {
                push("tls.rootCAs", format!("root CA file `{m}` does not exist"));
            }
        }
    }
    out
}

/// Whether a file named by a `FileOrContent` is missing (inline data never is).
pub(crate) fn missing_file(f: &FileOrContent) -> Option<String> {
    file_missing(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in [
            "10.0.0.1:80",
            "db.service.consul:5432",
            "[::1]:80",
            "xxx.xxx.xxx.xxx:8080",
            "a_b:1",
        ] {
            assert!(check_address(ok, false).is_ok(), "{ok}");
        }
        assert!(check_address(":80", true).is_ok());
        for (bad, needle) in [
            ("private-ip-server-1:8080/", "non-numeric port `8080/`"),
            ("xx.xx.xx.xx:xx", "non-numeric port `xx`"),
            ("10.0.0.1", "no port"),
            (":80", "no host"),
            ("http://a:80", "scheme"),
            ("a:70000", "out of range"),
            ("::1:80", "brackets"),
            (
                "<private-ip-server-1>:<private-port-server-1>",
                "non-numeric port",
            ),
        ] {
            let e = check_address(bad, false).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_ip_or_cidr("10.0.0.0/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_ip_or_cidr("1.2.3.4").unwrap().to_string(),
            "1.2.3.4/32"
        );
        assert_eq!(parse_ip_or_cidr("::1").unwrap().to_string(), "::1/128");
        assert!(
            parse_ip_or_cidr("10.0.0.0/33")
                .unwrap_err()
                .contains("10.0.0.0/33")
        );
    }
}
