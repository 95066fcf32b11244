//! A tiny HTTP/1.1 server for unit tests of the client and the watches (plain or TLS), on
//! 127.0.0.1 with port 0. The end-to-end tests use the dev catalog instead.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A request as the stub saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub query: String,
    pub headers: HashMap<String, String>,
}

#[allow(dead_code)]
impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// A query parameter's value (`Some("")` for a bare key).
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .split('&')
            .find_map(|kv| match kv.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if kv == key => Some(""),
                _ => None,
            })
    }

    pub fn index(&self) -> u64 {
        self.param("index")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// The answer to send.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[allow(dead_code)]
impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.into(),
        }
    }

    pub fn with_header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn with_index(self, index: u64) -> Reply {
        self.with_header("X-Consul-Index", &index.to_string())
    }
}

type Handler = Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

#[allow(dead_code)] // not every test reads every counter
pub struct Stub {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(dead_code)]
impl Stub {
    pub async fn start<F>(f: F) -> Stub
    where
        F: Fn(&Request) -> Reply + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        Self::start_async(move |r| {
            let reply = f(&r);
            async move { reply }
        })
        .await
    }

    pub async fn start_async<F, Fut>(f: F) -> Stub
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        Self::start_inner(Arc::new(move |r| Box::pin(f(r))), None).await
    }

    pub async fn start_tls<F>(f: F, tls: rustls::ServerConfig) -> Stub
    where
        F: Fn(&Request) -> Reply + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        Self::start_inner(
            Arc::new(move |r| {
                let reply = f(&r);
                Box::pin(async move { reply })
            }),
            Some(Arc::new(tls)),
        )
        .await
    }

    async fn start_inner(handler: Handler, tls: Option<Arc<rustls::ServerConfig>>) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let (s2, c2, i2, m2) = (
            seen.clone(),
            connections.clone(),
            in_flight.clone(),
            max_in_flight.clone(),
        );
        let task = tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                c2.fetch_add(1, Ordering::SeqCst);
                let (h, s, i, m) = (handler.clone(), s2.clone(), i2.clone(), m2.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(sock).await {
                                serve(tls, h, s, i, m).await;
                            }
                        }
                        None => serve(sock, h, s, i, m).await,
                    }
                });
            }
        });
        Stub {
            addr,
            seen,
            connections,
            in_flight,
            max_in_flight,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .count()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    sock: S,
    h: Handler,
    seen: Arc<Mutex<Vec<Request>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
) {
    let mut r = BufReader::new(sock);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let mut headers = HashMap::new();
        let mut len = 0usize;
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                return;
            }
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = v.trim().parse().unwrap_or(0);
                }
                headers.insert(k, v.trim().to_owned());
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (target.clone(), String::new()),
        };
        let req = Request {
            path,
            query,
            headers,
        };
        seen.lock().unwrap().push(req.clone());
        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        max_in_flight.fetch_max(now, Ordering::SeqCst);
        let reply = h(req).await;
        in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut out = format!(
            "HTTP/1.1 {} X\r\nContent-Length: {}\r\n",
            reply.status,
            reply.body.len()
        );
        for (k, v) in &reply.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&reply.body);
        if r.get_mut().write_all(out.as_bytes()).await.is_err() {
            return;
        }
        let _ = r.get_mut().flush().await;
    }
}
