//! The `stoa` binary: command-line options, logging, and the server until SIGINT/SIGTERM;
//! or a subcommand (`stoa users ...`).

use std::io::IsTerminal as _;
use std::process::ExitCode;

use broker::Config;
use broker::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: glibc grows a worker thread's arena one page at a time,
/// an `mprotect` call each (12,000 a second while room history fills at 300,000
/// deliveries/s), and its malloc and free took another 6% of the core. See
/// docs/PERFORMANCE.md for what the change bought.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "users") {
        return broker::cli::users(args);
    }
    if args.get(1).is_some_and(|a| a == "config") {
        return broker::cli::config(&args);
    }
    let config = match Config::load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("stoa: {e}");
            return ExitCode::from(2);
        }
    };
    // Quiet by default but for the operator's actions (`audit`); RUST_LOG=debug shows every
    // frame's command (never bodies).
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,audit=info"));
    // Colours only on a terminal: a file or the journal gets plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs.init(),
        // The session's span (id, address, transport, user) rides on every line it logs.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = config.workers {
        builder.worker_threads(workers);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stoa: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(broker::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoa: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
