//! Consul Connect: the gateway's leaf certificate and the CA roots, watched with blocking queries
//! on `/v1/agent/connect/ca/leaf/<serviceName>` and `/v1/agent/connect/ca/roots`.
//!
//! Once both have arrived the provider publishes a [`ConnectIdentity`]: the leaf (the gateway's
//! SVID, `spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<serviceName>`) and every root still trusted
//! (the bundle). The gateway hands it to the transport crate's identity source, so Connect
//! transports (named `connect-<service>`, see [`crate::convert`]) present the leaf, trust the
//! roots and require the backend's exact SPIFFE ID. When Consul rotates the leaf or the roots a
//! new identity is published and new connections use it; open connections are not touched.

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::api::{CaRoots, LeafCert};
use crate::client::{ClientError, ConsulClient};
use crate::watch::{Blocking, WatchTiming};

/// The gateway's Connect identity: leaf certificate and key, and the CA roots.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectIdentity {
    /// The gateway's service name in Consul (`providers.consulCatalog.serviceName`).
    pub service: String,
    /// The leaf's SPIFFE ID.
    pub spiffe_id: String,
    /// The Connect CA's trust domain (`<cluster id>.consul`).
    pub trust_domain: String,
    /// The leaf certificate chain (PEM, leaf first).
    pub cert_chain_pem: String,
    /// The leaf's private key (PEM). Never printed.
    pub key_pem: String,
    /// Every trusted root certificate (PEM), active one first.
    pub roots_pem: Vec<String>,
    /// Leaf serial number (hex), for logs.
    pub serial: String,
    /// Leaf expiry (RFC 3339).
    pub valid_before: String,
}

impl fmt::Debug for ConnectIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectIdentity")
            .field("service", &self.service)
            .field("spiffe_id", &self.spiffe_id)
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots_pem.len())
            .field("serial", &self.serial)
            .field("valid_before", &self.valid_before)
            .finish_non_exhaustive()
    }
}

impl ConnectIdentity {
    /// The leaf chain as DER certificates.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.cert_chain_pem.as_bytes())
            .filter_map(Result::ok)
            .collect()
    }

    /// The leaf's private key.
    pub fn private_key(&self) -> Option<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).ok()
    }

    /// The roots as DER certificates.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots_pem
            .iter()
            .flat_map(|p| CertificateDer::pem_slice_iter(p.as_bytes()).filter_map(Result::ok))
            .collect()
    }

    /// The datacenter in the leaf's SPIFFE ID (`…/dc/<dc>/…`).
    pub fn datacenter(&self) -> Option<&str> {
        let mut parts = self.spiffe_id.split('/');
        parts.find(|p| *p == "dc")?;
        parts.next().filter(|d| !d.is_empty())
    }

    fn build(service: &str, leaf: &LeafCert, roots: &CaRoots) -> Result<ConnectIdentity, String> {
        if roots.trust_domain.is_empty() {
            return Err("the CA roots have no TrustDomain".into());
        }
        let mut sorted: Vec<_> = roots.roots.iter().collect();
        sorted.sort_by_key(|r| !r.active);
        let roots_pem: Vec<String> = sorted
            .iter()
            .map(|r| r.root_cert.clone())
            .filter(|p| !p.trim().is_empty())
            .collect();
        if roots_pem.is_empty() {
            return Err("Consul returned no CA root".into());
        }
        let id = ConnectIdentity {
            service: service.to_owned(),
            spiffe_id: leaf.service_uri.clone(),
            trust_domain: roots.trust_domain.clone(),
            cert_chain_pem: leaf.cert_pem.clone(),
            key_pem: leaf.private_key_pem.clone(),
            roots_pem,
            serial: leaf.serial_number.clone(),
            valid_before: leaf.valid_before.clone(),
        };
        if id.cert_chain().is_empty() {
            return Err(format!("the leaf certificate of {service:?} is not PEM"));
        }
        if id.private_key().is_none() {
            return Err(format!(
                "the leaf key of {service:?} is not a PEM private key"
            ));
        }
        if id.roots().is_empty() {
            return Err("the CA roots are not PEM certificates".into());
        }
        Ok(id)
    }
}

/// Something the Connect watches report to the provider.
#[derive(Debug)]
pub enum ConnectEvent {
    /// A watch failed (kept retrying).
    Failed {
        /// `Connect CA roots` or `Connect leaf of <service>`.
        what: String,
        /// The error.
        error: String,
    },
    /// A watch answered after failing.
    Recovered {
        /// As in `Failed`.
        what: String,
    },
}

/// Watches the leaf of `service` and the roots until the task is dropped, publishing the identity
/// on `out` once both have arrived and on every change.
pub async fn run(
    client: ConsulClient,
    timing: Arc<WatchTiming>,
    service: String,
    out: watch::Sender<Option<Arc<ConnectIdentity>>>,
    report: impl Fn(ConnectEvent) + Send + Sync,
) {
    let state: std::sync::Mutex<(Option<CaRoots>, Option<LeafCert>)> =
        std::sync::Mutex::new((None, None));
    let publish = |state: &(Option<CaRoots>, Option<LeafCert>)| {
        let (Some(roots), Some(leaf)) = state else {
            return;
        };
        match ConnectIdentity::build(&service, leaf, roots) {
            Ok(id) => {
                let id = Arc::new(id);
                let changed = out.send_if_modified(|cur| {
                    if cur.as_deref() == Some(&*id) {
                        return false;
                    }
                    *cur = Some(id.clone());
                    true
                });
                if changed {
                    tracing::info!(service = %service, spiffe_id = %id.spiffe_id, serial = %id.serial, roots = id.roots_pem.len(), valid_before = %id.valid_before, "Consul Connect identity updated");
                }
            }
            Err(error) => report(ConnectEvent::Failed {
                what: format!("Connect identity of {service:?}"),
                error,
            }),
        }
    };
    let roots_what = "Connect CA roots".to_owned();
    let leaf_what = format!("Connect leaf of {service:?}");
    let leaf_path = ["v1", "agent", "connect", "ca", "leaf", service.as_str()];
    let roots_loop = watch_one::<CaRoots>(
        &client,
        &timing,
        &["v1", "agent", "connect", "ca", "roots"],
        &roots_what,
        |v| {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.0 = Some(v);
            publish(&st);
        },
        &report,
    );
    let leaf_loop = watch_one::<LeafCert>(
        &client,
        &timing,
        &leaf_path,
        &leaf_what,
        |v| {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.1 = Some(v);
            publish(&st);
        },
        &report,
    );
    tokio::join!(roots_loop, leaf_loop);
}

async fn watch_one<T: serde::de::DeserializeOwned + Send + 'static>(
    client: &ConsulClient,
    timing: &Arc<WatchTiming>,
    segments: &[&str],
    what: &str,
    on_value: impl Fn(T),
    report: &(impl Fn(ConnectEvent) + Send + Sync),
) {
    let mut b = Blocking::new(timing.clone());
    let mut failing = false;
    loop {
        b.pace().await;
        let r: Result<Option<T>, ClientError> = b.query(client, segments, None, true).await;
        match r {
            Ok(v) => {
                if failing {
                    failing = false;
                    report(ConnectEvent::Recovered {
                        what: what.to_owned(),
                    });
                }
                if let Some(v) = v {
                    on_value(v);
                }
            }
            Err(e) => {
                failing = true;
                report(ConnectEvent::Failed {
                    what: what.to_owned(),
                    error: e.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use tagway_config::ConsulEndpoint;

    use super::*;
    use crate::client::Settings;
    use crate::test_pki::Ca;
    use crate::test_stub::{Reply, Stub};

    fn roots_json(td: &str, pems: &[&str]) -> String {
        let roots: Vec<serde_json::Value> = pems
            .iter()
            .enumerate()
            .map(|(i, p)| serde_json::json!({"ID": format!("r{i}"), "RootCert": p, "Active": i == pems.len() - 1}))
            .collect();
        serde_json::json!({"ActiveRootID": "x", "TrustDomain": td, "Roots": roots}).to_string()
    }

    fn leaf_json(ca: &Ca, uri: &str, serial: &str) -> String {
        let leaf = ca.leaf(&[], &[uri]);
        serde_json::json!({
            "SerialNumber": serial, "CertPEM": leaf.cert_pem, "PrivateKeyPEM": leaf.key_pem,
            "Service": "tagway", "ServiceURI": uri, "ValidBefore": "2030-01-01T00:00:00Z"
        })
        .to_string()
    }

    #[tokio::test]
    async fn publishes_once_both_arrived_and_follows_rotation() {
        let ca1 = Ca::new("connect root 1");
        let ca2 = Ca::new("connect root 2");
        let uri = "spiffe://1111.consul/ns/default/dc/dc1/svc/tagway";
        let state = Arc::new(Mutex::new((
            roots_json("1111.consul", &[&ca1.pem()]),
            1u64,
            Option::<String>::None,
            1u64,
        )));
        let notify = Arc::new(tokio::sync::Notify::new());
        let (s2, n2) = (state.clone(), notify.clone());
        let stub = Stub::start_async(move |req| {
            let (s, n) = (s2.clone(), n2.clone());
            async move {
                loop {
                    let wait = n.notified();
                    {
                        let st = s.lock().unwrap();
                        if req.path.ends_with("/roots") {
                            if req.index() < st.1 {
                                return Reply::json(200, &st.0).with_index(st.1);
                            }
                        } else if let Some(leaf) = &st.2
                            && req.index() < st.3
                        {
                            return Reply::json(200, leaf).with_index(st.3);
                        }
                    }
                    if tokio::time::timeout(Duration::from_secs(1), wait)
                        .await
                        .is_err()
                    {
                        let st = s.lock().unwrap();
                        let i = if req.path.ends_with("/roots") {
                            st.1
                        } else {
                            st.3
                        };
                        return Reply::json(
                            200,
                            if req.path.ends_with("/roots") {
                                &st.0
                            } else {
                                st.2.as_deref().unwrap_or("{}")
                            },
                        )
                        .with_index(i);
                    }
                }
            }
        })
        .await;
        let ep = ConsulEndpoint {
            address: Some(stub.addr().to_string()),
            ..Default::default()
        };
        let client = ConsulClient::new(
            Settings::resolve(&ep, false, false, false, &|_| None).unwrap(),
            4,
        )
        .unwrap();
        let (tx, mut rx) = watch::channel(None);
        let timing = Arc::new(WatchTiming {
            wait: Duration::from_secs(1),
            ..Default::default()
        });
        let task = tokio::spawn(run(client, timing, "tagway".into(), tx, |_| {}));

        // Roots alone publish nothing.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.borrow_and_update().is_none());

        {
            let mut st = state.lock().unwrap();
            st.2 = Some(leaf_json(&ca1, uri, "01"));
            st.3 = 2;
        }
        notify.notify_waiters();
        let id = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap()
            .clone()
            .unwrap();
        assert_eq!(id.spiffe_id, uri);
        assert_eq!(id.trust_domain, "1111.consul");
        assert_eq!(id.datacenter(), Some("dc1"));
        assert_eq!(id.roots().len(), 1);
        assert!(id.private_key().is_some());
        assert!(!format!("{id:?}").contains("PRIVATE"));

        // Root rotation: both roots trusted, the new active one first.
        {
            let mut st = state.lock().unwrap();
            st.0 = roots_json("1111.consul", &[&ca1.pem(), &ca2.pem()]);
            st.1 = 3;
        }
        notify.notify_waiters();
        let id2 = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|v| v.as_ref().is_some_and(|i| i.roots_pem.len() == 2)),
        )
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
        assert_eq!(id2.roots_pem[0], ca2.pem());

        // Leaf rotation.
        {
            let mut st = state.lock().unwrap();
            st.2 = Some(leaf_json(&ca2, uri, "02"));
            st.3 = 4;
        }
        notify.notify_waiters();
        let id3 = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|v| v.as_ref().is_some_and(|i| i.serial == "02")),
        )
        .await
        .unwrap()
        .unwrap()
        .clone()
        .unwrap();
        assert_ne!(id3.cert_chain_pem, id2.cert_chain_pem);
        task.abort();
    }

    #[test]
    fn broken_material_is_refused() {
        let ca = Ca::new("r");
        let roots: CaRoots = serde_json::from_str(&roots_json("td.consul", &[&ca.pem()])).unwrap();
        let leaf = LeafCert {
            cert_pem: "garbage".into(),
            private_key_pem: "garbage".into(),
            ..Default::default()
        };
        let e = ConnectIdentity::build("tagway", &leaf, &roots).unwrap_err();
        assert!(e.contains("tagway"), "{e}");
        let no_td = CaRoots {
            trust_domain: String::new(),
            ..roots
        };
        assert!(ConnectIdentity::build("tagway", &leaf, &no_td).is_err());
    }
}
