//! The Stoa broker: STOMP 1.0-1.2 over WebSocket and TCP, with topic routing.
//!
//! The data path (docs/ARCHITECTURE.md, which also gives the layers and what each module
//! may import): socket -> [`transport`] -> codec -> [`session`] -> [`router`] ->
//! [`service`] -> [`outbox`] (per connection) -> writer ([`connection`]) -> socket.
//! [`server::run`] starts it all.

pub mod acl;
pub mod admin;
pub mod admission;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod destination;
pub mod durable;
pub mod error;
pub mod http;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod pace;
pub mod receipts;
pub mod room_api;
pub mod router;
pub mod server;
pub mod service;
pub mod services;
pub mod session;
pub mod sessions;
pub mod sockjs;
pub mod state;
pub mod store;
pub mod tls;
pub mod transport;
pub mod writer;

pub use config::Config;
pub use server::run;
