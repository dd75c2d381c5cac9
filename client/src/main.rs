//! `stoa-cli`: send, subscribe and chat from a terminal, against Stoa or any STOMP broker.
//!
//! Exit codes: 0 success; 1 other failure; 2 bad usage; 3 connection refused or failed;
//! 4 the broker answered with an ERROR frame; 5 a timeout (a receipt, a connection, or
//! `sub --timeout` before `--count` messages).

mod bench;

use std::io::{BufRead, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use client::{Backoff, Client, ClientError, Message, Options, SubscribeOptions};
use futures_util::StreamExt;
use stomp_codec::{Command, Frame, Version};

#[derive(Debug, Parser)]
#[command(
    name = "stoa-cli",
    version,
    about = "Send, subscribe and chat over STOMP (Stoa or any STOMP 1.0-1.2 broker)"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

impl Global {
    /// The URLs given, in order.
    fn urls(&self) -> Vec<&str> {
        self.url.iter().map(String::as_str).collect()
    }
}

#[derive(Debug, Args)]
struct Global {
    /// Broker URL: ws://, wss://, tcp:// or tcp+tls://. Several (repeated, or separated by
    /// commas) are the nodes of one service: the first that answers is used, and `chat`
    /// moves to the next when its connection is lost. `bench` uses the first.
    #[arg(
        long,
        global = true,
        env = "STOA_URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    url: Vec<String>,
    /// CONNECT login (in Stoa's anonymous mode, your display name).
    #[arg(long, global = true, env = "STOA_LOGIN")]
    login: Option<String>,
    /// CONNECT passcode.
    #[arg(long, global = true, env = "STOA_PASSCODE")]
    passcode: Option<String>,
    /// A token (a JWT for a broker in --auth jwt), sent as the CONNECT passcode.
    #[arg(long, global = true, env = "STOA_TOKEN", conflicts_with = "passcode")]
    token: Option<String>,
    /// A PEM file of certificates to trust for wss:// and tcp+tls:// besides the web's
    /// roots (a private CA, a self-signed broker).
    #[arg(long = "tls-ca", global = true, env = "STOA_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// CONNECT host (virtual host); the URL's host by default.
    #[arg(long, global = true)]
    host: Option<String>,
    /// Offer only this STOMP version (1.0, 1.1 or 1.2); all three by default.
    #[arg(long = "stomp-version", global = true)]
    stomp_version: Option<Version>,
    /// Seconds to wait for the connection and for each receipt.
    #[arg(long = "connect-timeout", global = true, default_value_t = 10.0)]
    connect_timeout: f64,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Send one message (the body from the argument, or else from standard input).
    Send {
        /// Destination, e.g. /topic/room.lobby.
        destination: String,
        /// Body; read from standard input when absent.
        body: Option<String>,
        /// Extra header, as name:value (repeatable).
        #[arg(short = 'H', long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// content-type of the body.
        #[arg(long = "content-type")]
        content_type: Option<String>,
        /// Ask for a receipt, wait for it, and fail if it does not come.
        #[arg(long)]
        receipt: bool,
    },
    /// Subscribe and print each message.
    Sub {
        /// Destination, e.g. /topic/room.lobby or /user/queue/dm.
        destination: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds (exit 5 if --count was not reached).
        #[arg(long)]
        timeout: Option<f64>,
        /// Replay the last N messages of a Stoa room first (x-history).
        #[arg(long, conflicts_with = "since")]
        history: Option<u64>,
        /// Replay a Stoa room's messages after this x-seq first (x-since).
        #[arg(long)]
        since: Option<u64>,
        /// Ack mode: auto, client or client-individual (client modes ack each message).
        #[arg(long, default_value = "auto", value_parser = ["auto", "client", "client-individual"])]
        ack: String,
        /// Extra SUBSCRIBE header, as name:value (repeatable).
        #[arg(short = 'H', long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Print one JSON object per message and line.
        #[arg(long)]
        json: bool,
    },
    /// Load scenarios against any STOMP broker; each ends with one JSON line of results.
    #[command(subcommand)]
    Bench(bench::Scenario),
    /// Chat in a Stoa room: typed lines are sent; /join ROOM, /msg USER TEXT, /who, /quit.
    Chat {
        /// The room to start in.
        #[arg(long, default_value = "lobby")]
        room: String,
        /// Your name (the CONNECT login).
        #[arg(long)]
        name: String,
    },
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not name:value"))?;
    if name.is_empty() {
        return Err(format!("{text:?} has an empty name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stoa-cli: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("stoa-cli: {message}");
            ExitCode::from(code)
        }
    }
}

struct Failure {
    code: u8,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = match &e {
            ClientError::ConnectionRefused(_)
            | ClientError::Tls(_)
            | ClientError::InvalidUrl(_) => 3,
            ClientError::Broker { .. } => 4,
            ClientError::Timeout(_) => 5,
            _ => 1,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn options(global: &Global, login: Option<&str>) -> Result<Options, Failure> {
    let mut options =
        Options::new().timeout(Duration::from_secs_f64(global.connect_timeout.max(0.1)));
    if let Some(login) = login.or(global.login.as_deref()) {
        options = options.login(login);
    }
    if let Some(passcode) = global.token.as_ref().or(global.passcode.as_ref()) {
        options = options.passcode(passcode);
    }
    if let Some(path) = &global.tls_ca {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let unreadable = |e: &dyn std::fmt::Display| Failure {
            code: 2,
            message: format!("--tls-ca {}: {e}", path.display()),
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| unreadable(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(&e))?;
        if certs.is_empty() {
            return Err(unreadable(&"no certificate in PEM"));
        }
        for cert in certs {
            options = options.trust_der(cert.to_vec());
        }
    }
    if let Some(host) = &global.host {
        options = options.host(host);
    }
    if let Some(version) = global.stomp_version {
        options = options.versions(&[version]);
    }
    Ok(options)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Cmd::Send {
            destination,
            body,
            headers,
            content_type,
            receipt,
        } => {
            let body = match body {
                Some(body) => Bytes::from(body),
                None => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).map_err(|e| {
                        Failure {
                            code: 1,
                            message: format!("cannot read standard input: {e}"),
                        }
                    })?;
                    Bytes::from(buf)
                }
            };
            let client =
                Client::connect_any(&cli.global.urls(), options(&cli.global, None)?).await?;
            let mut frame = Frame::new(Command::Send)
                .with_header("destination", &destination)
                .with_body(body);
            if let Some(content_type) = &content_type {
                frame.headers.push("content-type", content_type);
            }
            for (name, value) in &headers {
                frame.headers.push(name, value);
            }
            if let Some(receipt) = client.send_frame(frame, receipt).await? {
                let ids: Vec<String> = ["message-id", "x-seq"]
                    .iter()
                    .filter_map(|h| receipt.header(h).map(|v| format!("{h}={v}")))
                    .collect();
                eprintln!(
                    "sent ({})",
                    if ids.is_empty() {
                        "receipt received".to_owned()
                    } else {
                        ids.join(" ")
                    }
                );
            }
            client.disconnect().await?;
            Ok(())
        }
        Cmd::Sub {
            destination,
            count,
            timeout,
            history,
            since,
            ack,
            headers,
            json,
        } => {
            let client =
                Client::connect_any(&cli.global.urls(), options(&cli.global, None)?).await?;
            let mut sub_options = SubscribeOptions::new();
            if ack != "auto" {
                sub_options = sub_options.ack(&ack);
            }
            if let Some(n) = history {
                sub_options = sub_options.header("x-history", n.to_string());
            }
            if let Some(seq) = since {
                sub_options = sub_options.header("x-since", seq.to_string());
            }
            for (name, value) in headers {
                sub_options = sub_options.header(name, value);
            }
            let mut sub = client.subscribe(&destination, sub_options).await?;
            // On standard error, so that scripts (and tests) can wait for it without
            // mixing it into the messages.
            eprintln!("subscribed to {destination}");
            let deadline =
                timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
            let mut received = 0u64;
            let stdout = std::io::stdout();
            while count.is_none_or(|n| received < n) {
                let next = match deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline, sub.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    },
                    None => sub.next().await,
                };
                let Some(message) = next else {
                    return Err(Failure {
                        code: 3,
                        message: "the connection was lost".into(),
                    });
                };
                let line = if json {
                    json_line(&message)
                } else {
                    readable(&message)
                };
                let mut out = stdout.lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
                drop(out);
                if ack != "auto" {
                    client.ack(&message).await?;
                }
                received += 1;
            }
            let _ = client.disconnect().await;
            match count {
                Some(n) if received < n => Err(Failure {
                    code: 5,
                    message: format!("timed out after {received} of {n} messages"),
                }),
                _ => Ok(()),
            }
        }
        Cmd::Chat { room, name } => chat(&cli.global, &room, &name).await,
        Cmd::Bench(scenario) => {
            let options = options(&cli.global, None)?.heart_beat(0, 0);
            let result = bench::run(&cli.global.urls(), &options, scenario)
                .await
                .map_err(|e| match e {
                    bench::BenchError::Client(e) => Failure::from(e),
                    other => Failure {
                        code: 5,
                        message: other.to_string(),
                    },
                })?;
            for (key, value) in result.as_object().into_iter().flatten() {
                eprintln!("{key:>20}: {value}");
            }
            println!("{result}");
            Ok(())
        }
    }
}

fn readable(message: &Message) -> String {
    let sender = message.header("x-sender");
    let seq = message
        .header("x-seq")
        .map(|s| format!(" #{s}"))
        .unwrap_or_default();
    match (message.header("x-event"), sender) {
        (Some(event), Some(user)) => format!("{}{seq}: * {user} {event}", message.destination()),
        (_, Some(user)) => format!("{}{seq} {user}: {}", message.destination(), message.text()),
        _ => format!("{}: {}", message.destination(), message.text()),
    }
}

fn json_line(message: &Message) -> String {
    let headers: serde_json::Map<String, serde_json::Value> = message
        .headers()
        .map(|(n, v)| (n.to_owned(), serde_json::Value::String(v.to_owned())))
        .collect();
    let mut object = serde_json::json!({
        "destination": message.destination(),
        "headers": headers,
    });
    match std::str::from_utf8(message.body()) {
        Ok(text) => object["body"] = serde_json::Value::String(text.to_owned()),
        Err(_) => {
            object["body_hex"] = serde_json::Value::String(
                message.body().iter().map(|b| format!("{b:02x}")).collect(),
            )
        }
    }
    object.to_string()
}

/// Interactive chat: one line per message on standard output, commands on standard input.
async fn chat(global: &Global, first_room: &str, name: &str) -> Result<(), Failure> {
    let options = options(global, Some(name))?.reconnect(Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(5),
        max_attempts: None,
    });
    let client = Client::connect_any(&global.urls(), options).await?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    // Standard input is blocking: read it on a thread of its own.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let say = |text: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    };
    let mut room = first_room.to_owned();
    let mut sub = client
        .subscribe(
            &format!("/topic/room.{room}"),
            SubscribeOptions::new().header("x-history", "20"),
        )
        .await?;
    let mut dms = client
        .subscribe("/user/queue/dm", SubscribeOptions::new())
        .await?;
    say(format!(
        "* you are {name} in #{room}; /join ROOM, /msg USER TEXT, /who, /quit"
    ));
    loop {
        tokio::select! {
            message = sub.next() => match message {
                Some(m) => say(chat_line(&m)),
                None => return Err(Failure { code: 3, message: "the connection was lost".into() }),
            },
            message = dms.next() => if let Some(m) = message {
                say(format!("[dm] {}: {}", m.header("x-sender").unwrap_or("?"), m.text()));
            },
            line = lines.recv() => {
                let Some(line) = line else { break };
                let line = line.trim_end_matches('\r');
                if let Some(rest) = line.strip_prefix('/') {
                    let (command, args) = rest.split_once(' ').unwrap_or((rest, ""));
                    match command {
                        "quit" => break,
                        "join" if !args.trim().is_empty() => {
                            let next = args.trim().to_owned();
                            match client.subscribe(&format!("/topic/room.{next}"), SubscribeOptions::new().header("x-history", "20")).await {
                                Ok(new_sub) => {
                                    let old = std::mem::replace(&mut sub, new_sub);
                                    let _ = old.unsubscribe().await;
                                    room = next;
                                    say(format!("* now in #{room}"));
                                }
                                Err(e) => say(format!("* cannot join {next}: {e}")),
                            }
                        }
                        "msg" => match args.split_once(' ') {
                            Some((user, text)) if !text.is_empty() => {
                                match client.send_with_receipt(&format!("/user/{user}/queue/dm"), text.to_owned()).await {
                                    Ok(_) => say(format!("[dm to {user}] {text}")),
                                    Err(e) => say(format!("* cannot message {user}: {e}")),
                                }
                            }
                            _ => say("* usage: /msg USER TEXT".into()),
                        },
                        "who" => match client.subscribe(&format!("/app/room.{room}.members"), SubscribeOptions::new()).await {
                            Ok(mut reply) => {
                                if let Some(m) = reply.next_within(Duration::from_secs(5)).await {
                                    let members: Vec<String> = serde_json::from_slice::<serde_json::Value>(m.body())
                                        .ok()
                                        .and_then(|v| v["members"].as_array().cloned())
                                        .unwrap_or_default()
                                        .iter()
                                        .filter_map(|v| v.as_str().map(str::to_owned))
                                        .collect();
                                    say(format!("* in #{room}: {}", members.join(", ")));
                                }
                                let _ = reply.unsubscribe().await;
                            }
                            Err(e) => say(format!("* cannot list members: {e}")),
                        },
                        _ => say("* commands: /join ROOM, /msg USER TEXT, /who, /quit".into()),
                    }
                } else if !line.is_empty()
                    && let Err(e) = client.send(&format!("/topic/room.{room}"), line.to_owned()).await
                {
                    say(format!("* not sent: {e}"));
                }
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(())
}

fn chat_line(m: &Message) -> String {
    let user = m.header("x-sender").unwrap_or("?");
    match m.header("x-event") {
        Some("join") => format!("* {user} joined"),
        Some("leave") => format!("* {user} left"),
        Some("gap") => "* (older messages are no longer kept)".to_owned(),
        Some(other) => format!("* {user} {other}"),
        None => format!("{user}: {}", m.text()),
    }
}
