//! The command line: flags with their `SYNCGATE_*` environment variables and
//! defaults, turned into the typed configs in `config`. Bad values exit with code
//! 2 and one line naming the option.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Url;

use crate::config::{self, CentralConfig, Secret};
use crate::keystone::RouteClass;

#[derive(Debug, Parser)]
#[command(
    name = "syncgate",
    version,
    about = "Keeps Keystone identity data in sync across sites"
)]
pub struct Cli {
    /// Log line format.
    #[arg(
        long,
        env = "SYNCGATE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the central gateway in front of the central Keystone.
    Central(CentralArgs),
}

/// Route classes as one comma-separated value.
#[derive(Debug, Clone)]
pub struct Classes(pub Vec<RouteClass>);

fn parse_classes(s: &str) -> Result<Classes, String> {
    config::parse_classes(s).map(Classes)
}

#[derive(Debug, Args)]
pub struct CentralArgs {
    /// Address the proxy listens on.
    #[arg(long, env = "SYNCGATE_LISTEN", default_value = "0.0.0.0:5000")]
    pub listen: SocketAddr,

    /// The central Keystone's base URL, e.g. http://keystone:5000.
    #[arg(long, env = "SYNCGATE_UPSTREAM", value_parser = config::parse_base_url)]
    pub upstream: Url,

    /// Address of the audit API, health and metrics.
    #[arg(long, env = "SYNCGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// Bearer token for the audit API (required off loopback).
    #[arg(long, env = "SYNCGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// The op log database URL (created if missing).
    #[arg(
        long,
        env = "SYNCGATE_DB",
        default_value = "sqlite://syncgate-central.db"
    )]
    pub db: String,

    /// The gateway's external URL; replaces the upstream's URL in JSON responses.
    #[arg(long, env = "SYNCGATE_PUBLIC_URL", value_parser = config::parse_base_url)]
    pub public_url: Option<Url>,

    /// How long to wait for the upstream's response headers.
    #[arg(long, env = "SYNCGATE_UPSTREAM_TIMEOUT", default_value = "30s",
          value_parser = config::parse_duration)]
    pub upstream_timeout: Duration,

    /// Largest replicable write body accepted (larger: 413).
    #[arg(long, env = "SYNCGATE_MAX_CAPTURE_BODY", default_value = "1MiB",
          value_parser = config::parse_size)]
    pub max_capture_body: usize,

    /// Route classes to replicate, comma-separated (identity, resource, assignment,
    /// credentials, policy, limits, federation, catalog, or all).
    #[arg(long, env = "SYNCGATE_REPLICATE",
          default_value = "identity,resource,assignment,credentials,policy,limits,federation",
          value_parser = parse_classes)]
    pub replicate: Classes,
}

impl CentralArgs {
    pub fn into_config(self) -> Result<CentralConfig, String> {
        let config = CentralConfig {
            listen: self.listen,
            upstream: self.upstream,
            admin_listen: self.admin_listen,
            admin_token: self.admin_token.map(Secret::new),
            db: self.db,
            public_url: self.public_url,
            upstream_timeout: self.upstream_timeout,
            max_capture_body: self.max_capture_body,
            replicate: self.replicate.0,
        };
        config.validate()?;
        Ok(config)
    }
}

/// What the command line asked for, or how to exit.
pub enum Parsed {
    Run(Box<Cli>),
    /// Print this and exit with this code (help, version, or a usage error).
    Exit {
        text: String,
        code: i32,
    },
}

impl Cli {
    /// Parses the process arguments. Usage errors become one line.
    pub fn parse_args<I, T>(args: I) -> Parsed
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        match Cli::try_parse_from(args) {
            Ok(cli) => Parsed::Run(Box::new(cli)),
            Err(e) if !e.use_stderr() => Parsed::Exit {
                text: e.to_string(),
                code: 0,
            },
            Err(e) => {
                // clap's first paragraph, without the usage and help hints.
                let rendered = e.to_string();
                let line: Vec<&str> = rendered
                    .lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                Parsed::Exit {
                    text: line.join(" "),
                    code: 2,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn central(args: &[&str]) -> Result<CentralConfig, String> {
        let argv = ["syncgate", "central"].iter().chain(args);
        match Cli::parse_args(argv) {
            Parsed::Run(cli) => match cli.command {
                Command::Central(a) => a.into_config(),
            },
            Parsed::Exit { text, code } => Err(format!("{code}: {text}")),
        }
    }

    #[test]
    fn defaults() {
        let c = central(&["--upstream", "http://keystone:5000"]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.db, "sqlite://syncgate-central.db");
        assert_eq!(c.upstream_timeout, Duration::from_secs(30));
        assert_eq!(c.max_capture_body, 1 << 20);
        assert_eq!(c.replicate, RouteClass::default_set());
    }

    #[test]
    fn bad_values_are_one_line_naming_the_option() {
        let e = central(&["--upstream", "http://k", "--upstream-timeout", "never"]).unwrap_err();
        assert!(
            e.starts_with("2: error:") && e.contains("--upstream-timeout"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let e = central(&["--upstream", "nope"]).unwrap_err();
        assert!(e.contains("--upstream"), "{e}");
        let e = central(&["--upstream", "http://k", "--replicate", "identity,x"]).unwrap_err();
        assert!(e.contains("--replicate") && e.contains("'x'"), "{e}");
        let e = central(&[]).unwrap_err();
        assert!(e.contains("--upstream"), "{e}");
        let e = central(&["--upstream", "http://k", "--admin-listen", "0.0.0.0:9090"]).unwrap_err();
        assert!(e.contains("--admin-token"), "{e}");
    }
}
