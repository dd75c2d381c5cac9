//! Byte streams to a broker: TCP, TCP with TLS, WebSocket and secure WebSocket.
//!
//! In: a URL (`tcp://`, `tcp+tls://`, `ws://`, `wss://`). Out: a [`Link`] that appends what
//! it reads to a buffer (so split frames and heart-beats need no special case) and writes
//! whole frames.

use std::sync::Arc;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::ClientError;

/// Where to connect, parsed from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port`
    Tcp {
        /// `host:port`
        addr: String,
    },
    /// `tcp+tls://host:port`
    TcpTls {
        /// `host:port`
        addr: String,
        /// The name the certificate must carry.
        host: String,
    },
    /// `ws://...` or `wss://...`
    WebSocket {
        /// The whole URL.
        url: String,
    },
}

/// Where it points, for logs: scheme and `host:port` only (a WebSocket URL's path and query
/// may carry a token).
impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { addr } => write!(f, "tcp://{addr}"),
            Endpoint::TcpTls { addr, .. } => write!(f, "tcp+tls://{addr}"),
            Endpoint::WebSocket { url } => match url::Url::parse(url) {
                Ok(u) => {
                    let host = u.host_str().unwrap_or_default();
                    match u.port() {
                        Some(port) => write!(f, "{}://{host}:{port}", u.scheme()),
                        None => write!(f, "{}://{host}", u.scheme()),
                    }
                }
                Err(_) => f.write_str("ws://?"),
            },
        }
    }
}

impl Endpoint {
    /// Parses a broker URL.
    ///
    /// # Errors
    /// [`ClientError::InvalidUrl`] for another scheme or a missing host.
    pub fn parse(url: &str) -> Result<Endpoint, ClientError> {
        let invalid = |why: &str| ClientError::InvalidUrl(format!("{url}: {why}"));
        let parsed = url::Url::parse(url).map_err(|e| match e {
            url::ParseError::RelativeUrlWithoutBase => {
                invalid("no scheme (tcp://, tcp+tls://, ws://, wss://)")
            }
            url::ParseError::EmptyHost => invalid("no host"),
            other => invalid(&other.to_string()),
        })?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("no host"))?;
        // `[::1]` stays bracketed in an address; the certificate name is the bare host.
        let addr = |default: u16| format!("{host}:{}", parsed.port().unwrap_or(default));
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        match parsed.scheme() {
            "tcp" | "stomp" => Ok(Endpoint::Tcp { addr: addr(61613) }),
            "tcp+tls" | "stomp+ssl" | "ssl" => Ok(Endpoint::TcpTls {
                addr: addr(61614),
                host: bare,
            }),
            "ws" | "wss" => Ok(Endpoint::WebSocket {
                url: url.to_owned(),
            }),
            other => Err(invalid(&format!("unknown scheme {other:?}"))),
        }
    }

    /// The host name, for CONNECT's `host` header.
    pub fn host(&self) -> String {
        match self {
            Endpoint::Tcp { addr } | Endpoint::TcpTls { addr, .. } => addr
                .rsplit_once(':')
                .map_or(addr.as_str(), |(h, _)| h)
                .to_owned(),
            Endpoint::WebSocket { url } => url::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default(),
        }
    }
}

/// TLS settings: the web's roots plus any extra certificates (a private CA, a self-signed
/// server).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// DER certificates trusted in addition to the web's roots.
    pub extra_roots: Vec<Vec<u8>>,
}

impl TlsOptions {
    fn client_config(&self) -> Result<Arc<ClientConfig>, ClientError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for der in &self.extra_roots {
            roots.add(der.clone().into()).map_err(|e| {
                ClientError::Tls(format!("cannot trust the given certificate: {e}"))
            })?;
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open connection to a broker.
pub(crate) enum Link {
    Bytes(Box<dyn Stream>),
    WebSocket(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Bytes(_) => "Link::Bytes",
            Link::WebSocket(_) => "Link::WebSocket",
        })
    }
}

fn refused(what: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::ConnectionRefused(format!("{what}: {e}"))
}

impl Link {
    /// Opens `endpoint`.
    pub(crate) async fn open(endpoint: &Endpoint, tls: &TlsOptions) -> Result<Link, ClientError> {
        match endpoint {
            Endpoint::Tcp { addr } => {
                let stream = TcpStream::connect(addr)
                    .await
                    .map_err(|e| refused(addr, e))?;
                let _ = stream.set_nodelay(true);
                Ok(Link::Bytes(Box::new(stream)))
            }
            Endpoint::TcpTls { addr, host } => {
                let stream = TcpStream::connect(addr)
                    .await
                    .map_err(|e| refused(addr, e))?;
                let _ = stream.set_nodelay(true);
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| ClientError::InvalidUrl(format!("{host}: {e}")))?;
                let tls = TlsConnector::from(tls.client_config()?)
                    .connect(name, stream)
                    .await
                    .map_err(|e| ClientError::Tls(format!("{addr}: {e}")))?;
                Ok(Link::Bytes(Box::new(tls)))
            }
            Endpoint::WebSocket { url } => {
                let mut request = url
                    .as_str()
                    .into_client_request()
                    .map_err(|e| ClientError::InvalidUrl(format!("{url}: {e}")))?;
                request.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static("v12.stomp, v11.stomp, v10.stomp"),
                );
                let connector = url
                    .starts_with("wss://")
                    .then(|| tls.client_config().map(Connector::Rustls))
                    .transpose()?;
                // disable_nagle: frames go out whole; Nagle would hold small ones back.
                let (socket, _) = tokio_tungstenite::connect_async_tls_with_config(
                    request, None, true, connector,
                )
                .await
                .map_err(|e| match e {
                    // A failed TLS handshake arrives as an I/O error around rustls' own.
                    tungstenite::Error::Io(io)
                        if io
                            .get_ref()
                            .is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()) =>
                    {
                        ClientError::Tls(format!("{url}: {io}"))
                    }
                    tungstenite::Error::Io(io) => refused(url, io),
                    tungstenite::Error::Tls(tls) => ClientError::Tls(format!("{url}: {tls}")),
                    other => refused(url, other),
                })?;
                Ok(Link::WebSocket(Box::new(socket)))
            }
        }
    }

    /// Appends received bytes to `buf`; `Ok(false)` when the broker closed.
    ///
    /// Cancel safe: used in `select!`.
    pub(crate) async fn read(&mut self, buf: &mut BytesMut) -> Result<bool, ClientError> {
        match self {
            Link::Bytes(stream) => {
                buf.reserve(16 * 1024);
                Ok(stream.read_buf(buf).await.map_err(ClientError::from)? > 0)
            }
            Link::WebSocket(socket) => match socket.next().await {
                Some(Ok(WsMessage::Text(t))) => {
                    buf.extend_from_slice(t.as_bytes());
                    Ok(true)
                }
                Some(Ok(WsMessage::Binary(b))) => {
                    buf.extend_from_slice(&b);
                    Ok(true)
                }
                Some(Ok(WsMessage::Close(_))) | None => Ok(false),
                // Pings and pongs: the broker is alive.
                Some(Ok(_)) => Ok(true),
                Some(Err(e)) => Err(ClientError::from(std::io::Error::other(e))),
            },
        }
    }

    /// Writes one encoded frame (or a heart-beat EOL).
    pub(crate) async fn write(&mut self, bytes: bytes::Bytes) -> Result<(), ClientError> {
        match self {
            Link::Bytes(stream) => {
                stream.write_all(&bytes).await.map_err(ClientError::from)?;
                stream.flush().await.map_err(ClientError::from)
            }
            Link::WebSocket(socket) => {
                // Text when UTF-8, as stomp.js does; binary bodies go in binary messages.
                let message = match tungstenite::Utf8Bytes::try_from(bytes.clone()) {
                    Ok(text) => WsMessage::Text(text),
                    Err(_) => WsMessage::Binary(bytes),
                };
                socket
                    .send(message)
                    .await
                    .map_err(|e| ClientError::from(std::io::Error::other(e)))
            }
        }
    }

    /// Closes politely.
    pub(crate) async fn close(&mut self) {
        match self {
            Link::Bytes(stream) => {
                let _ = stream.shutdown().await;
            }
            Link::WebSocket(socket) => {
                let _ = socket.send(WsMessage::Close(None)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_name_a_url_by_scheme_and_address_only() {
        let shown = |url: &str| Endpoint::parse(url).unwrap().to_string();
        assert_eq!(
            shown("ws://127.0.0.1:8080/ws?access_token=secret"),
            "ws://127.0.0.1:8080"
        );
        assert_eq!(shown("wss://chat.example.com/ws"), "wss://chat.example.com");
        assert_eq!(shown("tcp://h"), "tcp://h:61613");
        assert_eq!(shown("tcp+tls://h:1"), "tcp+tls://h:1");
    }

    #[test]
    fn urls_name_their_transport() {
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:61613").unwrap(),
            Endpoint::Tcp {
                addr: "127.0.0.1:61613".into()
            }
        );
        assert_eq!(
            Endpoint::parse("tcp://broker").unwrap(),
            Endpoint::Tcp {
                addr: "broker:61613".into()
            }
        );
        assert_eq!(
            Endpoint::parse("tcp+tls://broker.example:61614").unwrap(),
            Endpoint::TcpTls {
                addr: "broker.example:61614".into(),
                host: "broker.example".into()
            }
        );
        assert_eq!(
            Endpoint::parse("ws://127.0.0.1:8080/ws").unwrap(),
            Endpoint::WebSocket {
                url: "ws://127.0.0.1:8080/ws".into()
            }
        );
        assert_eq!(
            Endpoint::parse("tcp+tls://[::1]:61614").unwrap(),
            Endpoint::TcpTls {
                addr: "[::1]:61614".into(),
                host: "::1".into()
            }
        );
        assert!(Endpoint::parse("http://x").is_err());
        assert!(Endpoint::parse("127.0.0.1:61613").is_err());
        assert!(Endpoint::parse("tcp://").is_err());
        assert_eq!(
            Endpoint::parse("ws://chat.example:8080/ws").unwrap().host(),
            "chat.example"
        );
    }
}
