//! The `syncgate` binary: parses the command line, starts logging and runs the
//! chosen command from the library.

use std::process::ExitCode;

use syncgate::cli::args::{Command, ConfigVerb, OplogVerb};
use syncgate::cli::{self, Outcome};

fn main() -> ExitCode {
    let cli = match parse(std::env::args_os()) {
        Ok(layered) => layered.cli,
        Err(code) => return code,
    };
    let command = match cli.command {
        Command::Central(args) => args.into_config().map(|c| Run::Central(Box::new(c))),
        Command::Broker(args) => args.into_config().map(|c| Run::Broker(Box::new(c))),
        Command::Edge(args) => args.into_config().map(|c| Run::Edge(Box::new(c))),
        Command::Keygen(args) => {
            return match args.key() {
                Ok(key) => {
                    println!("{key}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("syncgate keygen: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Audit(args) => return audit(*args),
        Command::Healthcheck(args) => return healthcheck(&args),
        Command::Config(args) => {
            let ConfigVerb::Check { role, args } = args.verb;
            return config_check(cli.config, role, args);
        }
        Command::Oplog(args) => return oplog(args.verb),
    };
    let command = match command {
        Ok(command) => command,
        Err(msg) => {
            eprintln!("error: {msg}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let role = match &command {
        Run::Central(_) => "syncgate-central",
        Run::Edge(_) => "syncgate-edge",
        Run::Broker(_) => "syncgate-broker",
    };
    let telemetry = {
        let _inside = runtime.enter();
        match syncgate::telemetry::init(cli.log_format, role) {
            Ok(t) => t,
            Err(msg) => {
                eprintln!("error: {msg}");
                return ExitCode::from(2);
            }
        }
    };
    let result = runtime.block_on(async {
        // Listening for SIGTERM and Ctrl-C starts before anything else, so a
        // signal during start-up is a graceful stop too, not a kill.
        let shutdown = shutdown_signal()?;
        match command {
            Run::Central(config) => {
                let central = syncgate::Central::build(*config).await?;
                central.run(shutdown).await
            }
            Run::Edge(config) => {
                let edge = syncgate::edge::Edge::build(*config).await?;
                edge.run(shutdown).await
            }
            Run::Broker(config) => {
                let broker = syncgate::broker::Broker::bind(*config).await?;
                broker.run(shutdown).await
            }
        }
    });
    // Spans still buffered are exported while the runtime still runs.
    runtime.block_on(async {
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line over the configuration file, or the exit code after
/// printing help, the version or a one-line error.
fn parse<I, T>(args: I) -> Result<cli::Layered, ExitCode>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match cli::parse(args) {
        Outcome::Run(layered) => Ok(*layered),
        Outcome::Exit { text, code: 0 } => {
            print!("{text}");
            Err(ExitCode::SUCCESS)
        }
        Outcome::Exit { text, code } => {
            eprintln!("{text}");
            Err(ExitCode::from(code as u8))
        }
    }
}

/// `syncgate config check ROLE [OPTIONS]`: the role's options parsed exactly as
/// `syncgate ROLE` would, validated, and printed with their sources.
fn config_check(
    config: Option<std::path::PathBuf>,
    role: syncgate::cli::args::Role,
    args: Vec<std::ffi::OsString>,
) -> ExitCode {
    let mut argv: Vec<std::ffi::OsString> = vec!["syncgate".into()];
    if let Some(path) = config {
        argv.push("--config".into());
        argv.push(path.into());
    }
    argv.push(role.name().into());
    argv.extend(args);
    let layered = match parse(argv) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let checked = match &layered.cli.command {
        Command::Central(a) => a.check(),
        Command::Edge(a) => a.check(),
        Command::Broker(a) => a.check(),
        _ => Ok(()),
    };
    match checked {
        Ok(()) => {
            print!("{}", layered.effective());
            println!("# ok: the {} configuration is valid", role.name());
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}

/// A one-thread runtime for the commands that are clients of a gateway.
fn client_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// `syncgate healthcheck`: 0 when one of the targets answers 200, else 1.
fn healthcheck(args: &syncgate::cli::args::HealthcheckArgs) -> ExitCode {
    let runtime = match client_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // Whether this host's listener answers: on a loopback address its
    // certificate (for the service's names, not the address asked) is not
    // checked, as Kubernetes' HTTPS probes do not; elsewhere it is.
    let loopback = args.targets().iter().all(|t| {
        reqwest::Url::parse(t).is_ok_and(|u| {
            let host = u.host_str().unwrap_or_default();
            host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
    });
    let client = match reqwest::Client::builder()
        .timeout(args.timeout)
        .danger_accept_invalid_certs(loopback)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        for url in args.targets() {
            match client.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => {
                    println!("{url}: {}", resp.status());
                    return ExitCode::SUCCESS;
                }
                Ok(resp) => eprintln!("{url}: {}", resp.status()),
                Err(e) => eprintln!("{url}: {}", e.without_url()),
            }
        }
        ExitCode::FAILURE
    })
}

/// `syncgate audit ...`: prints what the admin API says; the exit code says
/// whether anything is out of sync.
/// `syncgate oplog copy`.
fn oplog(verb: OplogVerb) -> ExitCode {
    let OplogVerb::Copy {
        from,
        to,
        from_password_file,
        to_password_file,
    } = verb;
    let runtime = match client_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let copied = runtime.block_on(syncgate::cli::oplog::copy(
        &from,
        &to,
        from_password_file.as_deref(),
        to_password_file.as_deref(),
    ));
    match copied {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn audit(args: syncgate::cli::args::AuditArgs) -> ExitCode {
    let request = match args.into_request() {
        Ok(r) => r,
        Err(msg) => {
            eprintln!("error: {msg}");
            return ExitCode::from(2);
        }
    };
    let runtime = match client_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let (text, code) = runtime.block_on(syncgate::cli::audit::run(&request));
    if code == syncgate::cli::audit::UNAVAILABLE {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    ExitCode::from(code)
}

enum Run {
    Central(Box<syncgate::CentralConfig>),
    Edge(Box<syncgate::settings::config::EdgeConfig>),
    Broker(Box<syncgate::broker::BrokerConfig>),
}

/// Resolves on Ctrl-C or SIGTERM; the handlers are installed when this is
/// called (not when the future is first polled).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
