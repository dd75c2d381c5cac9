//! The `stoa` subcommands besides serving: `stoa users add | passwd | remove | list`, and
//! `stoa config` (every option as commented TOML; `--markdown` for docs/CONFIG.md).
//!
//! In: the command line, standard input (passwords) and the broker's data directory
//! (`--data-dir`, `STOA_DATA_DIR`, or `data-dir` in the `--config` file). Out: changes to the
//! accounts database, which a running broker picks up within a second.

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::auth::accounts::Accounts;

/// `stoa users`: accounts for `--auth users`.
#[derive(Debug, Parser)]
#[command(name = "stoa users", about = "Manage the accounts of --auth users")]
struct UsersCli {
    #[command(subcommand)]
    command: UsersCommand,

    /// The broker's data directory, where the accounts are kept.
    #[arg(long, env = "STOA_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,

    /// The broker's TOML config file; its `data-dir` is used unless --data-dir is given.
    #[arg(long, env = "STOA_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Adds an account.
    Add {
        /// The user name (what CONNECT's `login` carries).
        name: String,
        /// A group for the ACL (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Sets a new password; the account's live sessions are closed.
    Passwd {
        /// The user name.
        name: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Removes an account; its live sessions are closed.
    Remove {
        /// The user name.
        name: String,
    },
    /// Lists the accounts: name and groups, one a line (never a hash).
    List,
}

/// Runs `stoa users ...` (`args` from the program name on).
pub fn users(args: Vec<OsString>) -> ExitCode {
    let mut args = args;
    // `stoa users add ...` parses as `stoa-users add ...`.
    if args.len() > 1 {
        args.remove(1);
    }
    let cli = match UsersCli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("stoa users: {message}");
            ExitCode::from(code)
        }
    }
}

struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }

    fn failed(message: impl ToString) -> Failure {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }
}

fn run(cli: UsersCli) -> Result<(), Failure> {
    let dir = data_dir(cli.data_dir, cli.config)?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::failed(format!("cannot create {}: {e}", dir.display())))?;
    let mut accounts = Accounts::open(&dir).map_err(Failure::failed)?;
    match cli.command {
        UsersCommand::Add {
            name,
            groups,
            password_stdin,
        } => {
            let password = password(password_stdin)?;
            accounts
                .add(&name, &password, &groups)
                .map_err(Failure::failed)?;
        }
        UsersCommand::Passwd {
            name,
            password_stdin,
        } => {
            let password = password(password_stdin)?;
            accounts.passwd(&name, &password).map_err(Failure::failed)?;
        }
        UsersCommand::Remove { name } => accounts.remove(&name).map_err(Failure::failed)?,
        UsersCommand::List => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for (name, groups) in accounts.list().map_err(Failure::failed)? {
                let line = if groups.is_empty() {
                    name
                } else {
                    format!("{name} {}", groups.join(","))
                };
                writeln!(out, "{line}").map_err(Failure::failed)?;
            }
        }
    }
    Ok(())
}

/// `--data-dir`, else the config file's `data-dir`, else the broker's default.
fn data_dir(flag: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    if let Some(path) = config {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Failure::usage(format!("cannot read config file {}: {e}", path.display()))
        })?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| Failure::usage(format!("invalid config file {}: {e}", path.display())))?;
        if let Some(dir) = table.get("data-dir").and_then(|v| v.as_str()) {
            return Ok(PathBuf::from(dir));
        }
    }
    Ok(PathBuf::from("./stoa-data"))
}

/// The new password: the first line of standard input with `--password-stdin`, else asked
/// twice without echo on the terminal.
fn password(from_stdin: bool) -> Result<String, Failure> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| Failure::failed(format!("cannot read the password: {e}")))?;
        let password = line.strip_suffix('\n').unwrap_or(&line);
        return Ok(password.strip_suffix('\r').unwrap_or(password).to_owned());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::usage(
            "standard input is not a terminal: give the password with --password-stdin",
        ));
    }
    let first = rpassword::prompt_password("Password: ")
        .map_err(|e| Failure::failed(format!("cannot read the password: {e}")))?;
    let again = rpassword::prompt_password("Again: ")
        .map_err(|e| Failure::failed(format!("cannot read the password: {e}")))?;
    if first != again {
        return Err(Failure::failed("the two passwords differ"));
    }
    Ok(first)
}

/// `stoa config [--markdown]`: prints every option as commented TOML (or docs/CONFIG.md).
pub fn config(args: &[OsString]) -> ExitCode {
    let text = match args.get(2).map(|a| a.to_string_lossy()) {
        None => crate::config::reference_toml(),
        Some(flag) if flag == "--markdown" => crate::config::reference_markdown(),
        Some(other) => {
            eprintln!("stoa config: unknown argument {other:?} (only --markdown)");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoa config: {e}");
            ExitCode::FAILURE
        }
    }
}
