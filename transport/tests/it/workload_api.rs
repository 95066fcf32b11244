//! The SPIFFE Workload API source against a fake agent: a gRPC server on a Unix socket speaking the
//! `FetchX509SVID` stream of the workload.proto the `spiffe` crate ships (messages declared here with
//! prost, the server streaming handled by tonic), which rotates the SVID on demand.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tagway_config::SpiffeSource;
use tagway_transport::{DialErrorReason, IdentityError, IdentitySource, SourceKind, Transport};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::codegen::http;

use crate::support::*;

/// `X509SVIDRequest` (workload.proto): no fields.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509SvidRequest {}

/// `X509SVIDResponse` (workload.proto).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: HashMap<String, Vec<u8>>,
}

/// `X509SVID` (workload.proto).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

fn response(id: &str, svid: &Leaf, bundle: &Ca) -> X509SvidResponse {
    let key = match svid.key_der() {
        rustls_pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => panic!("rcgen writes PKCS#8"),
    };
    X509SvidResponse {
        svids: vec![X509Svid {
            spiffe_id: id.to_owned(),
            x509_svid: svid.der.to_vec(),
            x509_svid_key: key,
            bundle: bundle.der().to_vec(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    }
}

/// The `FetchX509SVID` server stream: the current response, then every pushed one.
struct FetchX509Svid {
    rx: watch::Receiver<X509SvidResponse>,
}

type SvidStream = Pin<Box<dyn Stream<Item = Result<X509SvidResponse, tonic::Status>> + Send>>;

impl tonic::server::ServerStreamingService<X509SvidRequest> for FetchX509Svid {
    type Response = X509SvidResponse;
    type ResponseStream = SvidStream;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<SvidStream>, tonic::Status>> + Send>>;

    fn call(&mut self, _request: tonic::Request<X509SvidRequest>) -> Self::Future {
        let mut rx = self.rx.clone();
        rx.mark_changed();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            let next = rx.borrow_and_update().clone();
            Some((Ok(next), rx))
        });
        Box::pin(async move { Ok(tonic::Response::new(Box::pin(stream) as SvidStream)) })
    }
}

/// A fake SPIFFE agent on a Unix socket in a temporary folder.
struct FakeAgent {
    endpoint: String,
    tx: watch::Sender<X509SvidResponse>,
    _dir: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    async fn start(initial: X509SvidResponse) -> Result<FakeAgent> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path)?;
        let (tx, rx) = watch::channel(initial);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let rx = rx.clone();
                            async move {
                                let response =
                                    if req.uri().path() == "/SpiffeWorkloadAPI/FetchX509SVID" {
                                        let mut grpc = tonic::server::Grpc::new(
                                            tonic_prost::ProstCodec::default(),
                                        );
                                        grpc.server_streaming(FetchX509Svid { rx }, req).await
                                    } else {
                                        tonic::Status::unimplemented("not served by the fake agent")
                                            .into_http()
                                    };
                                Ok::<_, Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FakeAgent {
            endpoint: format!("unix:{}", path.display()),
            tx,
            _dir: dir,
            _task: task,
        })
    }

    fn push(&self, response: X509SvidResponse) {
        self.tx.send_replace(response);
    }
}

const GATEWAY: &str = "spiffe://example.org/gateway";
const DB: &str = "spiffe://example.org/db";

#[tokio::test]
async fn rotation_new_dials_use_the_new_svid_open_connections_continue() -> Result<()> {
    let ca = Ca::new("example.org CA");
    let first = ca.svid(GATEWAY);
    let second = ca.svid(GATEWAY);
    let agent = FakeAgent::start(response(GATEWAY, &first, &ca)).await?;

    let identity = tokio::time::timeout(
        Duration::from_secs(20),
        IdentitySource::from_config(&SpiffeSource {
            workload_api_addr: Some(agent.endpoint.clone()),
            ..SpiffeSource::default()
        }),
    )
    .await
    .context("the Workload API source did not sync")??;
    assert_eq!(identity.kind(), SourceKind::WorkloadApi);
    let current = identity.current().unwrap();
    assert_eq!(current.spiffe_id(), Some(GATEWAY));
    assert_eq!(
        current.trust_domains().collect::<Vec<_>>(),
        vec!["example.org"]
    );

    let transport = Transport::new(
        "mesh",
        &spiffe_transport(&[DB], None),
        Some(identity.clone()),
    )?;
    let mut backend =
        Backend::tls(server_tls(&ca.svid(DB), Some(&[ca.der()])), ExpectProxy::No).await;
    let mut open = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut open, b"first").await?;
    assert_eq!(backend.next().await.client_certs.unwrap()[0], first.der);

    let mut rotations = identity.subscribe();
    agent.push(response(GATEWAY, &second, &ca));
    tokio::time::timeout(Duration::from_secs(20), rotations.changed())
        .await
        .context("no rotation within 20s")??;

    let mut fresh = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut fresh, b"second").await?;
    assert_eq!(backend.next().await.client_certs.unwrap()[0], second.der);
    round_trip(&mut open, b"the first connection continues").await?;
    Ok(())
}

#[tokio::test]
async fn federated_bundles_verify_backends_of_other_trust_domains() -> Result<()> {
    let ca = Ca::new("example.org CA");
    let other = Ca::new("other.org CA");
    let mut initial = response(GATEWAY, &ca.svid(GATEWAY), &ca);
    initial
        .federated_bundles
        .insert("spiffe://other.org".to_owned(), other.der().to_vec());
    let agent = FakeAgent::start(initial).await?;
    let identity = tokio::time::timeout(
        Duration::from_secs(20),
        IdentitySource::workload_api(Some(&agent.endpoint)),
    )
    .await
    .context("the Workload API source did not sync")??;
    let transport = Transport::new(
        "federated",
        &spiffe_transport(&[], Some("other.org")),
        Some(identity),
    )?;

    // A backend of other.org with a certificate from other.org's CA: verified with the federated
    // bundle (the backend trusts the gateway's CA).
    let backend = Backend::tls(
        server_tls(&other.svid("spiffe://other.org/api"), Some(&[ca.der()])),
        ExpectProxy::No,
    )
    .await;
    let mut stream = transport.dial(&backend.address(), false, None).await?;
    round_trip(&mut stream, b"federated").await?;

    // An other.org ID signed by example.org's CA does not chain to other.org's bundle.
    let backend = Backend::tls(
        server_tls(&ca.svid("spiffe://other.org/api"), Some(&[ca.der()])),
        ExpectProxy::No,
    )
    .await;
    let err = transport
        .dial(&backend.address(), false, None)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), DialErrorReason::UntrustedCertificate, "{err}");
    Ok(())
}

#[tokio::test]
async fn an_invalid_endpoint_is_an_error() {
    let err = IdentitySource::workload_api(Some("http://not-a-spiffe-endpoint"))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::WorkloadApi { .. }), "{err}");
    assert!(
        err.to_string().contains("http://not-a-spiffe-endpoint"),
        "{err}"
    );
}
#[tokio::test]
async fn an_absent_agent_times_out_with_an_error() {
    let err = IdentitySource::workload_api_within(
        Some("unix:/nonexistent/agent.sock"),
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, IdentityError::WorkloadApiTimeout { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("SPIFFE Workload API at unix:/nonexistent/agent.sock: no SVID within 300ms"),
        "{err}"
    );
}
