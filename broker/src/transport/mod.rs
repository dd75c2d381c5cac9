//! Byte transports under the STOMP codec: TCP and WebSocket differ only here.
//!
//! In: a socket. Out: a [`Transport`](crate::connection::Transport) whose reads append raw
//! bytes to the connection's read buffer (so frames split across reads or WebSocket
//! messages, and heart-beat EOLs, need no special case) and whose writes send each frame.

pub mod sockjs;
pub mod tcp;
pub mod ws;
