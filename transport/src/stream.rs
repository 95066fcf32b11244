//! The connection to a backend: plain TCP or TLS over TCP.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A dialed backend connection.
#[derive(Debug)]
pub enum BackendStream {
    /// Plain TCP (the gateway may use zero-copy paths on it).
    Plain(TcpStream),
    /// TLS toward the backend.
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendStream {
    /// The TCP connection underneath.
    pub fn as_tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(tcp) => tcp,
            BackendStream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// True for a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, BackendStream::Tls(_))
    }

    /// The backend's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.as_tcp().peer_addr()
    }

    /// The gateway's address on this connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.as_tcp().local_addr()
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            BackendStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            BackendStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            BackendStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(tcp) => tcp.is_write_vectored(),
            BackendStream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            BackendStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            BackendStream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
