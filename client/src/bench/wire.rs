//! The load generator's own lean STOMP connection: a plain socket, a hand-rolled
//! WebSocket framing layer, and the codec's decoder, with no driver task, channel or
//! reconnection between the socket and the scenario.
//!
//! In: a `ws://` or `tcp://` URL and a login. Out: frames read in order, and frames written
//! on demand. The library's [`client::Client`] is the client for applications; this path
//! exists so that a benchmark measures the broker and not the generator's bookkeeping (see
//! docs/PERFORMANCE.md, "Who limits the numbers").

use bytes::{Buf, BufMut, BytesMut};
use stomp_codec::{Command, DecodeError, Decoder, Frame, Limits, Version, encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Read sizes: small for an idle connection (the conns scenario holds thousands), growing
/// to large for a busy subscriber, which then takes many frames per read.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;
/// The longest WebSocket handshake response read.
const MAX_HANDSHAKE: usize = 16 * 1024;

/// Bytes this generator read and wrote on its sockets, every connection together: what
/// each technique of the rooms scenario costs on the wire.
pub static WIRE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Adds `n` bytes to [`WIRE_BYTES`].
pub fn count_wire_bytes(n: usize) {
    WIRE_BYTES.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The peer broke WebSocket or STOMP.
    #[error("{0}")]
    Protocol(String),
    /// The broker sent an ERROR frame.
    #[error("the broker sent ERROR: {0}")]
    Refused(String),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// The URL names something the lean path does not speak.
    #[error("the benchmark speaks ws:// and tcp:// only, not {0}")]
    Unsupported(String),
}

impl From<DecodeError> for WireError {
    fn from(e: DecodeError) -> WireError {
        WireError::Protocol(format!("undecodable frame from the broker: {e}"))
    }
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> WireError {
    move |source| WireError::Io { context, source }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`.
    addr: String,
    /// The WebSocket path, or `None` for raw STOMP over TCP.
    ws_path: Option<String>,
    /// CONNECT's `login`.
    pub login: Option<String>,
    /// CONNECT's `passcode`.
    pub passcode: Option<String>,
    /// CONNECT's `host`, sent only when given (RabbitMQ reads it as a virtual host).
    pub host: Option<String>,
}

impl Target {
    /// Reads `ws://host:port/path` or `tcp://host:port`.
    ///
    /// # Errors
    /// Any other scheme, e.g. `wss://`: the generator has no TLS.
    pub fn parse(
        url: &str,
        login: Option<String>,
        passcode: Option<String>,
    ) -> Result<Target, WireError> {
        let parsed = url::Url::parse(url).map_err(|_| WireError::Unsupported(url.to_owned()))?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| WireError::Unsupported(url.to_owned()))?;
        let ws_path = match parsed.scheme() {
            "ws" => {
                let mut path = parsed.path().to_owned();
                if let Some(query) = parsed.query() {
                    path = format!("{path}?{query}");
                }
                Some(path)
            }
            "tcp" => None,
            _ => return Err(WireError::Unsupported(url.to_owned())),
        };
        let port = parsed.port_or_known_default().unwrap_or(61613);
        let addr = format!("{host}:{port}");
        Ok(Target {
            addr,
            ws_path,
            login,
            passcode,
            host: None,
        })
    }

    /// This target with another login (passcode kept).
    pub fn with_login(&self, login: String) -> Target {
        Target {
            login: Some(login),
            ..self.clone()
        }
    }
}

/// The reading half: whole STOMP frames, in order.
#[derive(Debug)]
pub struct WireReader {
    socket: OwnedReadHalf,
    ws: bool,
    /// Bytes as read (WebSocket frames, or STOMP directly over TCP).
    raw: BytesMut,
    /// STOMP bytes taken out of WebSocket frames.
    stomp: BytesMut,
    decoder: Decoder,
    /// Bytes asked for on the next read: doubled whenever a read fills them.
    read_size: usize,
}

/// The writing half.
#[derive(Debug)]
pub struct WireWriter {
    socket: OwnedWriteHalf,
    ws: bool,
    version: Version,
    mask: u32,
    scratch: BytesMut,
    out: BytesMut,
}

/// Opens a connection: TCP, the WebSocket upgrade (offering STOMP 1.2), CONNECT, and
/// CONNECTED.
///
/// # Errors
/// The socket, a refused upgrade, or an ERROR in place of CONNECTED.
pub async fn connect(target: &Target) -> Result<(WireReader, WireWriter), WireError> {
    let socket = open_socket(&target.addr).await?;
    socket
        .set_nodelay(true)
        .map_err(io("setting TCP_NODELAY"))?;
    let (read, write) = socket.into_split();
    let ws = target.ws_path.is_some();
    let mut reader = WireReader {
        socket: read,
        ws,
        raw: BytesMut::new(),
        stomp: BytesMut::new(),
        decoder: Decoder::new(Limits::default()),
        read_size: MIN_READ,
    };
    let mut writer = WireWriter {
        socket: write,
        ws,
        version: Version::V1_2,
        mask: seed(),
        scratch: BytesMut::new(),
        out: BytesMut::new(),
    };
    if let Some(path) = &target.ws_path {
        upgrade(&mut reader, &mut writer, &target.addr, path).await?;
    }
    let mut frame = Frame::new(Command::Connect)
        .with_header("accept-version", "1.0,1.1,1.2")
        .with_header("heart-beat", "0,0");
    if let Some(login) = &target.login {
        frame = frame.with_header("login", login);
    }
    if let Some(passcode) = &target.passcode {
        frame = frame.with_header("passcode", passcode);
    }
    if let Some(host) = &target.host {
        frame = frame.with_header("host", host);
    }
    writer.send(&frame).await?;
    let connected = reader.next().await?;
    if connected.command != Command::Connected {
        return Err(WireError::Protocol(format!(
            "expected CONNECTED, got {:?}",
            connected.command
        )));
    }
    let version = match connected.header("version") {
        Some("1.1") => Version::V1_1,
        Some("1.2") => Version::V1_2,
        _ => Version::V1_0,
    };
    reader.decoder.set_version(version);
    writer.version = version;
    Ok((reader, writer))
}

/// A TCP connection to `addr`. To a loopback address, each connection comes from its own
/// loopback source address: with tens of thousands of connections to one port, the
/// kernel's search for a free ephemeral port of 127.0.0.1 otherwise takes most of the
/// generator's time (`__inet_check_established`, measured with perf at 19,000 connections).
async fn open_socket(addr: &str) -> Result<TcpStream, WireError> {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);
    let resolved = tokio::net::lookup_host(addr)
        .await
        .map_err(io("resolving the broker's address"))?
        .next()
        .ok_or_else(|| WireError::Protocol(format!("{addr} resolves to no address")))?;
    let is_loopback_v4 = matches!(resolved.ip(), IpAddr::V4(ip) if ip.is_loopback());
    if !is_loopback_v4 {
        return TcpStream::connect(resolved).await.map_err(io("connecting"));
    }
    // 127.1.0.1 onwards: 65,000 addresses, none of them the broker's.
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % 65_000;
    let [_, _, hi, lo] = (n + 1).to_be_bytes();
    let source = SocketAddr::from((Ipv4Addr::new(127, 1, hi, lo), 0));
    let socket = tokio::net::TcpSocket::new_v4().map_err(io("opening a socket"))?;
    socket
        .bind(source)
        .map_err(io("binding a loopback source address"))?;
    socket.connect(resolved).await.map_err(io("connecting"))
}

/// A per-connection starting point for the masking keys: distinct between connections,
/// not secret (RFC 6455's masking protects intermediaries, which loopback has none of).
fn seed() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0x9e37_79b9);
    NEXT.fetch_add(0x6a09_e667, Ordering::Relaxed) | 1
}

async fn upgrade(
    reader: &mut WireReader,
    writer: &mut WireWriter,
    addr: &str,
    path: &str,
) -> Result<(), WireError> {
    let key = generate_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: v12.stomp, v11.stomp, v10.stomp\r\n\r\n"
    );
    writer
        .socket
        .write_all(request.as_bytes())
        .await
        .map_err(io("sending the WebSocket upgrade"))?;
    let end = loop {
        if let Some(i) = end_of_head(&reader.raw) {
            break i;
        }
        if reader.raw.len() > MAX_HANDSHAKE {
            return Err(WireError::Protocol(
                "the upgrade response is too long".into(),
            ));
        }
        let n = reader
            .socket
            .read_buf(&mut reader.raw)
            .await
            .map_err(io("reading the WebSocket upgrade response"))?;
        if n == 0 {
            return Err(WireError::Closed);
        }
    };
    let head = reader.raw.split_to(end + 4);
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(WireError::Protocol(format!(
            "the upgrade was refused: {status}"
        )));
    }
    let accept = derive_accept_key(key.as_bytes());
    let accepted = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == accept
        })
    });
    if !accepted {
        return Err(WireError::Protocol(
            "the upgrade response has no matching Sec-WebSocket-Accept".into(),
        ));
    }
    Ok(())
}

fn end_of_head(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

impl WireReader {
    /// The next frame other than heart-beats.
    ///
    /// Cancel-safe: everything read stays buffered for the next call.
    ///
    /// # Errors
    /// The socket, bytes that are not WebSocket or STOMP, or the broker closing.
    pub async fn next(&mut self) -> Result<Frame, WireError> {
        loop {
            if let Some(frame) = self.decoded()? {
                return Ok(frame);
            }
            self.raw.reserve(self.read_size);
            let room = self.raw.capacity() - self.raw.len();
            let n = self
                .socket
                .read_buf(&mut self.raw)
                .await
                .map_err(io("reading"))?;
            count_wire_bytes(n);
            if n == 0 {
                return Err(WireError::Closed);
            }
            if n == room {
                self.read_size = (self.read_size * 2).min(MAX_READ);
            }
        }
    }

    /// The next frame, failing on an ERROR frame.
    ///
    /// # Errors
    /// As [`WireReader::next`], plus [`WireError::Refused`].
    pub async fn next_ok(&mut self) -> Result<Frame, WireError> {
        let frame = self.next().await?;
        if frame.command == Command::Error {
            return Err(WireError::Refused(
                frame.header("message").unwrap_or_default().to_owned(),
            ));
        }
        Ok(frame)
    }

    fn decoded(&mut self) -> Result<Option<Frame>, WireError> {
        if !self.ws {
            return Ok(self.decoder.decode(&mut self.raw)?);
        }
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.stomp)? {
                return Ok(Some(frame));
            }
            // Pings go unanswered: neither stoa nor RabbitMQ Web-STOMP sends them, and the
            // scenarios ask for no heart-beats.
            if !unwrap_ws_frame(&mut self.raw, &mut self.stomp)? {
                return Ok(None);
            }
        }
    }
}

/// Takes one whole WebSocket frame off `raw`, appending a data frame's payload to `stomp`
/// and dropping a control frame; `false` when no whole frame is buffered yet.
fn unwrap_ws_frame(raw: &mut BytesMut, stomp: &mut BytesMut) -> Result<bool, WireError> {
    let [b0, b1, ..] = raw[..] else {
        return Ok(false);
    };
    if b1 & 0x80 != 0 {
        return Err(WireError::Protocol("the server masked a frame".into()));
    }
    let (header, len): (usize, usize) = match b1 & 0x7f {
        126 if raw.len() >= 4 => (4, usize::from(u16::from_be_bytes([raw[2], raw[3]]))),
        127 if raw.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&raw[2..10]);
            let n = usize::try_from(u64::from_be_bytes(n))
                .map_err(|_| WireError::Protocol("a frame longer than memory".into()))?;
            (10, n)
        }
        126 | 127 => return Ok(false),
        n => (2, usize::from(n)),
    };
    if raw.len() < header.saturating_add(len) {
        return Ok(false);
    }
    raw.advance(header);
    let payload = raw.split_to(len);
    match b0 & 0x0f {
        // Continuation, text, binary: STOMP bytes, whatever the framing.
        0..=2 => stomp.extend_from_slice(&payload),
        8 => return Err(WireError::Closed),
        // Ping, pong, reserved: nothing for STOMP.
        _ => {}
    }
    Ok(true)
}

/// Appends one client WebSocket frame, masked with `key`, to `out`.
fn frame_ws(out: &mut BytesMut, opcode: u8, payload: &[u8], key: [u8; 4]) {
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(0x80 | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(0x80 | 127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
}

impl WireWriter {
    /// Appends `frame` to the pending output; [`WireWriter::flush`] sends it.
    pub fn queue(&mut self, frame: &Frame) {
        if !self.ws {
            encode(frame, self.version, &mut self.out);
            return;
        }
        self.scratch.clear();
        encode(frame, self.version, &mut self.scratch);
        // xorshift: a different masking key for every frame.
        self.mask ^= self.mask << 13;
        self.mask ^= self.mask >> 17;
        self.mask ^= self.mask << 5;
        frame_ws(&mut self.out, 0x1, &self.scratch, self.mask.to_be_bytes());
    }

    /// Writes everything queued.
    ///
    /// # Errors
    /// The socket.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        if !self.out.is_empty() {
            self.socket
                .write_all(&self.out)
                .await
                .map_err(io("writing"))?;
            count_wire_bytes(self.out.len());
            self.out.clear();
        }
        Ok(())
    }

    /// Queues and writes one frame.
    ///
    /// # Errors
    /// The socket.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), WireError> {
        self.queue(frame);
        self.flush().await
    }
}

/// Sends `frame` with a `receipt` header and reads until its RECEIPT, skipping MESSAGEs
/// (a room's join notice may come first).
///
/// # Errors
/// The socket, an ERROR, or another unexpected frame.
pub async fn request(
    reader: &mut WireReader,
    writer: &mut WireWriter,
    frame: Frame,
    receipt: &str,
) -> Result<(), WireError> {
    writer.send(&frame.with_header("receipt", receipt)).await?;
    loop {
        let answer = reader.next_ok().await?;
        match answer.command {
            Command::Receipt if answer.header("receipt-id") == Some(receipt) => return Ok(()),
            Command::Message => {}
            other => {
                return Err(WireError::Protocol(format!(
                    "expected RECEIPT {receipt}, got {other:?}"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_transport() {
        let t = Target::parse("ws://127.0.0.1:8080/ws", None, None).unwrap();
        assert_eq!(
            (t.addr.as_str(), t.ws_path.as_deref()),
            ("127.0.0.1:8080", Some("/ws"))
        );
        let t = Target::parse("ws://localhost:15674", None, None).unwrap();
        assert_eq!(t.ws_path.as_deref(), Some("/"));
        let t = Target::parse("tcp://127.0.0.1:61613", None, None).unwrap();
        assert_eq!((t.addr.as_str(), t.ws_path), ("127.0.0.1:61613", None));
        assert!(matches!(
            Target::parse("wss://example.org/ws", None, None),
            Err(WireError::Unsupported(_))
        ));
    }

    /// A server's view of a client frame: the payload, unmasked.
    fn unmask(frame: &[u8]) -> Vec<u8> {
        let (len, at) = match frame[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
            n => (usize::from(n), 2),
        };
        assert_eq!(frame[1] & 0x80, 0x80, "client frames are masked");
        let key = &frame[at..at + 4];
        let payload = &frame[at + 4..];
        assert_eq!(payload.len(), len);
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect()
    }

    #[test]
    fn client_frames_are_masked_in_both_length_forms() {
        for size in [5, 125, 126, 300] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut out = BytesMut::new();
            frame_ws(&mut out, 0x1, &payload, [0xde, 0xad, 0xbe, 0xef]);
            assert_eq!(out[0], 0x81);
            assert_eq!(unmask(&out), payload, "size {size}");
        }
    }

    #[test]
    fn server_frames_are_unwrapped_whatever_the_reads_split() {
        let body = vec![b'b'; 200];
        let message = Frame::new(Command::Message)
            .with_header("destination", "/topic/a")
            .with_body(body.clone());
        let mut stomp = BytesMut::new();
        encode(&message, Version::V1_2, &mut stomp);
        let mut wire = BytesMut::new();
        wire.put_u8(0x81);
        wire.put_u8(126);
        wire.put_u16(u16::try_from(stomp.len()).unwrap());
        wire.put_slice(&stomp);
        wire.put_slice(&[0x89, 2, b'h', b'i', 0x81, 1, b'\n']);
        let mut decoder = Decoder::new(Limits::default());
        let (mut raw, mut out) = (BytesMut::new(), BytesMut::new());
        let (mut frames, mut unwrapped) = (Vec::new(), 0);
        // One byte at a time: every split point of the stream.
        for b in wire.iter() {
            raw.put_u8(*b);
            while unwrap_ws_frame(&mut raw, &mut out).unwrap() {
                unwrapped += 1;
            }
            if let Some(f) = decoder.decode(&mut out).unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(unwrapped, 3, "the MESSAGE, the ping and the heart-beat");
        assert_eq!(frames.len(), 1);
        assert_eq!(&frames[0].body[..], &body[..]);
        // The ping's payload never reached the STOMP bytes (the decoder took the
        // heart-beat EOL; "hi" would have stayed as the start of a frame).
        assert!(out.is_empty(), "left over: {out:?}");
        assert!(raw.is_empty());
        assert!(matches!(
            unwrap_ws_frame(&mut BytesMut::from(&[0x88u8, 0][..]), &mut out),
            Err(WireError::Closed)
        ));
        assert!(matches!(
            unwrap_ws_frame(
                &mut BytesMut::from(&[0x81u8, 0x81, 0, 0, 0, 0, b'x'][..]),
                &mut out
            ),
            Err(WireError::Protocol(_))
        ));
    }
}
