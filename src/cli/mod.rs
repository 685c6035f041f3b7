//! The roof: the command line. `args` holds the flags of each command, `audit`
//! the `syncgate audit` client of central's audit API; this file the
//! configuration file and its layering: built-in defaults, then the TOML
//! file (`--config FILE` or `SYNCGATE_CONFIG`), then `SYNCGATE_*` environment
//! variables, then flags. The file has one section per role (`[central]`,
//! `[edge]`, `[broker]`, `[audit]`) whose keys are the role's long options in
//! snake case (`upstream_timeout = "30s"` is `--upstream-timeout 30s`), plus
//! `log_format` at the top. clap does the layering: the file's values become the
//! options' defaults, so an environment variable or a flag still wins, and every
//! value goes through the same parser as on the command line.
//!
//! `syncgate config check <role>` prints the effective configuration, each value
//! with where it came from and secrets as `***`, and exits 2 on any error.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

pub mod args;
pub mod audit;
pub mod oplog;

use args::Cli;

/// The environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "SYNCGATE_CONFIG";

/// Sections of the file: the roles that take options from it.
const ROLES: [&str; 4] = ["central", "edge", "broker", "audit"];

/// Keys allowed at the top of the file: options of every role.
const GLOBAL_KEYS: [&str; 1] = ["log_format"];

/// A parsed configuration file.
#[derive(Debug, Default)]
pub struct ConfigFile {
    path: PathBuf,
    /// Role (or "" for the top level) → option key → value as an option string.
    values: BTreeMap<String, BTreeMap<String, String>>,
}

/// The command line parsed over the file, and what it takes to explain it.
pub struct Layered {
    pub cli: Cli,
    matches: ArgMatches,
    command: clap::Command,
    /// (role, arg id) of every value taken from the file.
    from_file: Vec<(String, String)>,
    file: Option<PathBuf>,
}

impl ConfigFile {
    /// Reads and checks the file's shape: known sections, plain values.
    pub fn load(path: &Path) -> Result<ConfigFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        ConfigFile::parse(path, &text)
    }

    /// A key of a section, as the option string (`""` for the top level).
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.values.get(section)?.get(key).map(String::as_str)
    }

    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, String> {
        let shown = path.display();
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            // toml's message spans several lines (a snippet of the file); the
            // first says what and where.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid TOML").trim();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    format!("config file {shown}: line {line}: {}", e.message().trim())
                }
                None => format!("config file {shown}: {first}"),
            }
        })?;
        let mut values: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (key, value) in table {
            if key == EDGES_TABLE {
                let scopes = edge_scopes(&value)
                    .map_err(|why| format!("config file {shown}: [{EDGES_TABLE}]: {why}"))?;
                values
                    .entry("central".into())
                    .or_default()
                    .insert(EDGE_SCOPES_FROM_TABLE.into(), scopes);
                continue;
            }
            if let toml::Value::Table(section) = value {
                if !ROLES.contains(&key.as_str()) {
                    return Err(format!(
                        "config file {shown}: unknown section [{key}] (sections: {})",
                        ROLES.join(", ")
                    ));
                }
                let entries = values.entry(key.clone()).or_default();
                for (name, v) in section {
                    let v = option_string(&v)
                        .map_err(|why| format!("config file {shown}: [{key}] {name}: {why}"))?;
                    entries.insert(name, v);
                }
            } else if GLOBAL_KEYS.contains(&key.as_str()) {
                let v = option_string(&value)
                    .map_err(|why| format!("config file {shown}: {key}: {why}"))?;
                values.entry(String::new()).or_default().insert(key, v);
            } else {
                return Err(format!(
                    "config file {shown}: unknown key '{key}' at the top (top-level keys: {}; \
                     role options go in [{}])",
                    GLOBAL_KEYS.join(", "),
                    ROLES.join("], [")
                ));
            }
        }
        if let Some(central) = values.get_mut("central") {
            if let Some(scopes) = central.remove(EDGE_SCOPES_FROM_TABLE) {
                if central.contains_key("edge_scope") {
                    return Err(format!(
                        "config file {shown}: [{EDGES_TABLE}] tables and [central] edge_scope \
                         exclude each other: give each edge's scope in one of them"
                    ));
                }
                central.insert("edge_scope".into(), scopes);
            }
        }
        Ok(ConfigFile {
            path: path.to_path_buf(),
            values,
        })
    }
}

/// The file's per-edge tables: `[edges.site2]` with `domains` and
/// `replicate` (lists, or "all"), central's `--edge-scope`.
const EDGES_TABLE: &str = "edges";
/// Where they wait while the file is read (no option has this name).
const EDGE_SCOPES_FROM_TABLE: &str = " edges tables";

/// `[edges.<id>]` tables as `--edge-scope`'s value.
fn edge_scopes(value: &toml::Value) -> Result<String, String> {
    let toml::Value::Table(edges) = value else {
        return Err("expected one table per edge: [edges.site2]".into());
    };
    let mut entries = Vec::new();
    for (edge, table) in edges {
        let toml::Value::Table(table) = table else {
            return Err(format!("{edge}: expected a table ([edges.{edge}])"));
        };
        let mut parts = Vec::new();
        for (key, v) in table {
            if key != "domains" && key != "replicate" {
                return Err(format!(
                    "{edge}: unknown key '{key}' (keys: domains, replicate)"
                ));
            }
            let list = option_string(v).map_err(|why| format!("{edge}: {key}: {why}"))?;
            if list
                .split(',')
                .any(|item| item.trim().is_empty() || item.contains([';', ' ']))
            {
                return Err(format!(
                    "{edge}: {key}: names must be non-empty, without ';' or spaces"
                ));
            }
            if list != "all" {
                parts.push(format!("{key}:{list}"));
            }
        }
        let spec = if parts.is_empty() {
            "all".to_string()
        } else {
            parts.join(";")
        };
        entries.push(format!("{edge}={spec}"));
    }
    Ok(entries.join(" "))
}

/// A TOML value as the string the option would be given on the command line:
/// lists become comma-separated.
fn option_string(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| match item {
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    Err("a list of plain values is expected".to_string())
                }
                other => option_string(other),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(",")),
        toml::Value::Table(_) => Err("a value is expected, not a table".into()),
    }
}

/// The option a file key names, in snake case.
fn key_of(arg: &clap::Arg) -> Option<String> {
    arg.get_long().map(|l| l.replace('-', "_"))
}

/// Options that make no sense in a file.
fn is_file_option(arg: &clap::Arg) -> bool {
    !matches!(
        arg.get_action(),
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
    ) && arg.get_id() != "config"
        && !arg.is_positional()
}

/// `--config FILE` (anywhere on the command line), else `SYNCGATE_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(rest) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(rest));
        }
    }
    std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// clap's error as one line, without the usage and help hints.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.to_string();
    let lines: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    lines.join(" ")
}

/// What parsing decided: run, or print and exit with a code.
pub enum Outcome {
    Run(Box<Layered>),
    Exit { text: String, code: i32 },
}

fn usage_error(e: clap::Error) -> Outcome {
    if e.use_stderr() {
        Outcome::Exit {
            text: one_line(&e),
            code: 2,
        }
    } else {
        Outcome::Exit {
            text: e.to_string(),
            code: 0,
        }
    }
}

/// Parses the command line over the configuration file (when one is named).
pub fn parse<I, T>(args: I) -> Outcome
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let file = match config_path(&args) {
        Some(path) => match ConfigFile::load(&path) {
            Ok(f) => Some(f),
            Err(text) => return Outcome::Exit { text, code: 2 },
        },
        None => None,
    };
    let mut skip: Vec<(String, String)> = Vec::new();
    // Two passes at most: a file value that conflicts with an option given in
    // the environment or on the command line gives way to it.
    for _ in 0..2 {
        let (command, from_file) = match with_file_defaults(file.as_ref(), &skip) {
            Ok(c) => c,
            Err(text) => return Outcome::Exit { text, code: 2 },
        };
        let matches = match command.clone().try_get_matches_from(&args) {
            Ok(m) => m,
            Err(e) => return usage_error(e),
        };
        let overridden = overridden_file_values(&command, &matches, &from_file);
        if !overridden.is_empty() && skip.is_empty() {
            skip = overridden;
            continue;
        }
        let cli = match Cli::from_arg_matches(&matches) {
            Ok(c) => c,
            Err(e) => return usage_error(e),
        };
        return Outcome::Run(Box::new(Layered {
            cli,
            matches,
            command,
            from_file,
            file: file.map(|f| f.path),
        }));
    }
    unreachable!("the second pass skips every overridden file value")
}

/// The command with the file's values as option defaults. Unknown keys, values
/// their option's parser refuses, and two file values that exclude each other
/// are errors naming the key.
fn with_file_defaults(
    file: Option<&ConfigFile>,
    skip: &[(String, String)],
) -> Result<(clap::Command, Vec<(String, String)>), String> {
    let mut command = Cli::command();
    let mut from_file = Vec::new();
    let Some(file) = file else {
        return Ok((command, from_file));
    };
    let shown = file.path.display().to_string();
    for (role, entries) in &file.values {
        // Built, so that conflicts are known from both sides.
        let mut built = command.clone();
        built.build();
        let target = if role.is_empty() {
            built
        } else {
            built
                .find_subcommand(role)
                .cloned()
                .ok_or_else(|| format!("config file {shown}: unknown section [{role}]"))?
        };
        let mut ids: Vec<(String, String)> = Vec::new();
        for (key, value) in entries {
            let arg = target
                .get_arguments()
                .filter(|a| is_file_option(a))
                .find(|a| key_of(a).as_deref() == Some(key.as_str()))
                .ok_or_else(|| unknown_key(&shown, role, key, &target))?;
            check_value(arg, value)
                .map_err(|why| format!("config file {shown}: {}: {why}", section_key(role, key)))?;
            ids.push((arg.get_id().to_string(), value.clone()));
        }
        // Two values in the file that exclude each other.
        for (id, _) in &ids {
            let arg = target.get_arguments().find(|a| a.get_id() == id.as_str());
            if let Some(arg) = arg {
                for other in target.get_arg_conflicts_with(arg) {
                    if ids.iter().any(|(o, _)| o == other.get_id().as_str()) {
                        return Err(format!(
                            "config file {shown}: {} and {} exclude each other",
                            section_key(role, &key_of(arg).unwrap_or_default()),
                            key_of(other).unwrap_or_default()
                        ));
                    }
                }
            }
        }
        for (id, value) in ids {
            if skip.iter().any(|(r, i)| r == role && *i == id) {
                continue;
            }
            let value = value.clone();
            // A secret from the file never shows in `--help`.
            let default = |a: clap::Arg| {
                let secret = a.is_hide_env_values_set();
                a.default_value(value)
                    .required(false)
                    .hide_default_value(secret)
            };
            if role.is_empty() {
                command = command.mut_arg(&id, default);
            } else {
                command = command.mut_subcommand(role, |sc| sc.mut_arg(&id, default));
            }
            from_file.push((role.clone(), id));
        }
    }
    Ok((command, from_file))
}

/// Runs a file value through its option's own parser.
fn check_value(arg: &clap::Arg, value: &str) -> Result<(), String> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match value {
            "true" | "false" => Ok(()),
            _ => Err(format!("'{value}' is not true or false")),
        };
    }
    let long = arg.get_long().unwrap_or_default().to_string();
    let probe = clap::Command::new("syncgate").no_binary_name(true).arg(
        clap::Arg::new(arg.get_id().clone())
            .long(long.clone())
            .action(arg.get_action().clone())
            .value_parser(arg.get_value_parser().clone()),
    );
    probe
        .try_get_matches_from([format!("--{long}"), value.to_string()])
        .map(drop)
        .map_err(|e| {
            let why = one_line(&e);
            why.strip_prefix("error: ").unwrap_or(&why).to_string()
        })
}

fn section_key(role: &str, key: &str) -> String {
    if role.is_empty() {
        key.to_string()
    } else {
        format!("[{role}] {key}")
    }
}

fn unknown_key(shown: &str, role: &str, key: &str, target: &clap::Command) -> String {
    let known: Vec<String> = target
        .get_arguments()
        .filter(|a| is_file_option(a))
        .filter_map(key_of)
        .collect();
    let hint = if key.contains('-') && known.iter().any(|k| *k == key.replace('-', "_")) {
        format!(" (keys are snake case: {})", key.replace('-', "_"))
    } else {
        String::new()
    };
    format!(
        "config file {shown}: {}: unknown key{hint}; known keys: {}",
        section_key(role, key),
        known.join(", ")
    )
}

/// File values of options that conflict with one given explicitly.
fn overridden_file_values(
    command: &clap::Command,
    matches: &ArgMatches,
    from_file: &[(String, String)],
) -> Vec<(String, String)> {
    let Some((role, sub)) = matches.subcommand() else {
        return Vec::new();
    };
    let mut built = command.clone();
    built.build();
    let Some(sc) = built.find_subcommand(role) else {
        return Vec::new();
    };
    from_file
        .iter()
        .filter(|(r, _)| r == role)
        .filter(|(_, id)| {
            sc.get_arguments()
                .find(|a| a.get_id() == id.as_str())
                .is_some_and(|arg| {
                    sc.get_arg_conflicts_with(arg).iter().any(|other| {
                        matches!(
                            sub.value_source(other.get_id().as_str()),
                            Some(ValueSource::EnvVariable | ValueSource::CommandLine)
                        )
                    })
                })
        })
        .cloned()
        .collect()
}

impl Layered {
    /// The effective configuration of the chosen role as TOML, each value with
    /// its source; secrets are `***`.
    pub fn effective(&self) -> String {
        let mut out = String::new();
        match &self.file {
            Some(p) => {
                let _ = writeln!(out, "# configuration file: {}", p.display());
            }
            None => out.push_str("# no configuration file (--config or SYNCGATE_CONFIG)\n"),
        }
        let mut command = self.command.clone();
        command.build();
        self.describe(&mut out, "", &command, &self.matches);
        if let Some((role, sub)) = self.matches.subcommand() {
            if let Some(sc) = command.find_subcommand(role) {
                let _ = writeln!(out, "\n[{role}]");
                self.describe(&mut out, role, sc, sub);
            }
        }
        out
    }

    fn describe(&self, out: &mut String, role: &str, cmd: &clap::Command, m: &ArgMatches) {
        // In the order of `--help` (taking defaults from the file reorders them).
        let mut pristine = Cli::command();
        pristine.build();
        let order: Vec<String> = if role.is_empty() {
            pristine
                .get_arguments()
                .map(|a| a.get_id().to_string())
                .collect()
        } else {
            pristine
                .find_subcommand(role)
                .map(|sc| sc.get_arguments().map(|a| a.get_id().to_string()).collect())
                .unwrap_or_default()
        };
        let mut args: Vec<&clap::Arg> = cmd.get_arguments().filter(|a| is_file_option(a)).collect();
        args.sort_by_key(|a| order.iter().position(|id| id == a.get_id().as_str()));
        for arg in args {
            if !role.is_empty() && arg.is_global_set() {
                continue;
            }
            let id = arg.get_id().as_str();
            let Some(key) = key_of(arg) else { continue };
            let raw: Vec<String> = m
                .get_raw(id)
                .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let source = match m.value_source(id) {
                Some(ValueSource::CommandLine) => format!("--{}", arg.get_long().unwrap_or(id)),
                Some(ValueSource::EnvVariable) => arg
                    .get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "environment".into()),
                Some(ValueSource::DefaultValue)
                    if self.from_file.iter().any(|(r, i)| r == role && i == id) =>
                {
                    "file".into()
                }
                Some(ValueSource::DefaultValue) => "default".into(),
                _ => "unset".into(),
            };
            if raw.is_empty() || source == "unset" {
                let _ = writeln!(out, "# {key} is not set");
                continue;
            }
            let value = if arg.is_hide_env_values_set() {
                "\"***\"".to_string()
            } else if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
                raw.join(",")
            } else {
                serde_json::to_string(&raw.join(",")).unwrap_or_default()
            };
            let _ = writeln!(out, "{key} = {value}  # {source}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::Command;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("syncgate.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn run(args: &[&str]) -> Result<Layered, (i32, String)> {
        match parse(args.iter().copied()) {
            Outcome::Run(l) => Ok(*l),
            Outcome::Exit { text, code } => Err((code, text)),
        }
    }

    #[test]
    fn file_values_sit_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            r#"
log_format = "json"
[central]
upstream = "http://keystone:5000"
upstream_timeout = "5s"
edges = ["a", "b"]
allow_new_edges = true
insecure_plaintext_sync = true
admin_token = "file-secret-1"
"#,
        );
        let p = path.to_str().unwrap();
        let l = run(&[
            "syncgate",
            "--config",
            p,
            "central",
            "--upstream-timeout",
            "7s",
        ])
        .unwrap();
        assert!(matches!(
            l.cli.log_format,
            crate::cli::args::LogFormat::Json
        ));
        let Command::Central(args) = &l.cli.command else {
            panic!("central")
        };
        assert_eq!(args.upstream.as_str(), "http://keystone:5000/");
        assert_eq!(args.upstream_timeout, std::time::Duration::from_secs(7));
        assert_eq!(args.edges, ["a", "b"]);
        assert!(args.allow_new_edges);
        let shown = l.effective();
        assert!(
            shown.contains("upstream_timeout = \"7s\"  # --upstream-timeout"),
            "{shown}"
        );
        assert!(
            shown.contains("upstream = \"http://keystone:5000/\"  # file")
                || shown.contains("upstream = \"http://keystone:5000\"  # file"),
            "{shown}"
        );
        assert!(
            shown.contains("listen = \"0.0.0.0:5000\"  # default"),
            "{shown}"
        );
        assert!(shown.contains("admin_token = \"***\"  # file"), "{shown}");
        assert!(!shown.contains("file-secret-1"), "{shown}");
    }

    /// Per-site scopes from `[edges.<id>]` tables or `--edge-scope`: each
    /// scoped edge declared, `all` meaning no scope, bad ones refused with
    /// the reason.
    #[test]
    fn edge_scopes_come_from_the_files_tables_or_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            r#"
[central]
upstream = "http://keystone:5000"
sync_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
edges = ["site1"]
[edges.site2]
domains = ["Default", "acme"]
replicate = ["identity", "resource", "assignment"]
[edges.site3]
domains = "all"
"#,
        );
        let p = path.to_str().unwrap();
        let config = |l: Layered| {
            let Command::Central(args) = l.cli.command else {
                panic!("central")
            };
            args.into_config()
        };
        let c = config(run(&["syncgate", "--config", p, "central"]).unwrap()).unwrap();
        assert_eq!(c.sync.edges, ["site1", "site2", "site3"]);
        assert_eq!(
            c.sync
                .scopes
                .iter()
                .map(|(e, s)| format!("{e}={s}"))
                .collect::<Vec<_>>(),
            ["site2=domains:Default,acme;replicate:identity,resource,assignment"]
        );
        // The flag, repeated or with several entries.
        let c = config(
            run(&[
                "syncgate",
                "central",
                "--upstream",
                "http://k:5000",
                "--sync-key",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "--edge-scope",
                "a=domains:x b=replicate:identity",
                "--edge-scope",
                "c=domains:y;replicate:resource",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(c.sync.scopes.len(), 3);
        assert_eq!(c.sync.edges, ["a", "b", "c"]);
        let refused = |args: &[&str]| {
            let mut argv = vec!["syncgate", "central", "--upstream", "http://k:5000"];
            if !args.contains(&"--insecure-plaintext-sync") {
                argv.extend(["--sync-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]);
            }
            argv.extend(args);
            match run(&argv) {
                Ok(l) => config(l).unwrap_err(),
                Err((_, text)) => text,
            }
        };
        for (args, why) in [
            (
                vec!["--edge-scope", "a=domains:x", "--edge-scope", "a=all"],
                "two scopes",
            ),
            (vec!["--edge-scope", "a"], "expected EDGE=SCOPE"),
            (vec!["--edge-scope", "a.b=all"], "not an edge ID"),
            (vec!["--edge-scope", "a=projects:x"], "unknown scope part"),
            (
                vec!["--edge-scope", "a=replicate:catalog"],
                "replicate:catalog is not replicated by central",
            ),
            (
                vec!["--edge-scope", "a=domains:x", "--insecure-plaintext-sync"],
                "needs a sync key",
            ),
        ] {
            let e = refused(&args);
            assert!(e.contains(why), "{args:?}: {e}");
        }
        for (text, why) in [
            ("[edges]\nsite2 = 1\n", "expected a table"),
            (
                "[edges.site2]\nprojects = [\"x\"]\n",
                "unknown key 'projects'",
            ),
            (
                "[edges.site2]\ndomains = [\"a b\"]\n",
                "without ';' or spaces",
            ),
            (
                "[central]\nedge_scope = \"a=all\"\n[edges.site2]\ndomains = [\"x\"]\n",
                "exclude each other",
            ),
        ] {
            let path = write(&dir, text);
            let e = run(&["syncgate", "--config", path.to_str().unwrap(), "central"])
                .err()
                .unwrap()
                .1;
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn secrets_from_the_file_never_show_in_help() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            r#"
[central]
upstream = "http://keystone:5000"
admin_token = "file-admin-secret"
sync_key = "file-sync-secret"
oplog_key = "file-oplog-secret"
broker_token = "file-broker-secret"
[edge]
broker_token = "file-edge-broker-secret"
sync_key = "file-edge-sync-secret"
[audit]
admin_token = "file-audit-secret"
"#,
        );
        let p = path.to_str().unwrap();
        for command in ["central", "edge", "audit"] {
            let help = match run(&["syncgate", "--config", p, command, "--help"]) {
                Err((0, help)) => help,
                Err((code, text)) => panic!("{command} --help: {code} {text}"),
                Ok(_) => panic!("{command} --help runs"),
            };
            assert!(
                help.contains("--sync-key") || help.contains("--admin-token"),
                "{help}"
            );
            assert!(!help.contains("file-"), "{command} --help: {help}");
        }
        let path = write(
            &dir,
            r#"
[central]
upstream = "http://keystone:5000"
broker_user = "syncgate"
broker_password = "file-broker-password"
"#,
        );
        let help = match run(&[
            "syncgate",
            "--config",
            path.to_str().unwrap(),
            "central",
            "--help",
        ]) {
            Err((0, help)) => help,
            other => panic!("central --help: {:?}", other.err()),
        };
        assert!(!help.contains("file-broker-password"), "{help}");
        // What is not a secret still shows where it comes from.
        let Err((0, help)) = run(&["syncgate", "--config", p, "central", "--help"]) else {
            panic!("help");
        };
        assert!(help.contains("http://keystone:5000"), "{help}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "[central]\nupstream_timout = \"5s\"\n",
                "[central] upstream_timout: unknown key",
            ),
            (
                "[central]\nupstream-timeout = \"5s\"\n",
                "keys are snake case: upstream_timeout",
            ),
            (
                "[central]\nupstream_timeout = \"soon\"\n",
                "[central] upstream_timeout:",
            ),
            (
                "[central]\nmax_capture_body = true\n",
                "[central] max_capture_body:",
            ),
            (
                "[centrl]\nupstream = \"http://k\"\n",
                "unknown section [centrl]",
            ),
            (
                "upstream = \"http://k\"\n",
                "unknown key 'upstream' at the top",
            ),
            (
                "[central]\nupstream = \"http://k\"\nupstream = 1\n",
                "duplicate key",
            ),
            (
                "[edge]\nid = [[\"x\"]]\n",
                "[edge] id: a list of plain values",
            ),
            (
                "[central]\nsync_key = \"k\"\nsync_key_file = \"/k\"\n",
                "exclude each other",
            ),
        ];
        for (text, expected) in cases {
            let path = write(&dir, text);
            let (code, msg) = run(&["syncgate", "--config", path.to_str().unwrap(), "central"])
                .err()
                .unwrap_or_else(|| panic!("{text} was accepted"));
            assert_eq!(code, 2, "{msg}");
            assert!(msg.contains(expected), "{text}: {msg}");
            assert!(msg.contains("syncgate.toml"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        let (code, msg) = run(&["syncgate", "--config", "/nonexistent.toml", "central"])
            .err()
            .unwrap();
        assert_eq!(code, 2);
        assert!(msg.contains("/nonexistent.toml"), "{msg}");
    }

    #[test]
    fn an_explicit_option_beats_a_conflicting_file_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "[central]\nupstream = \"http://k\"\nsync_key_file = \"/nonexistent/key\"\n",
        );
        let key = crate::protocol::crypto::generate_key();
        let l = run(&[
            "syncgate",
            "central",
            "--config",
            path.to_str().unwrap(),
            "--sync-key",
            &key,
        ])
        .unwrap();
        let Command::Central(args) = l.cli.command else {
            panic!("central")
        };
        let config = args.into_config().unwrap();
        assert!(matches!(
            config.sync.key,
            crate::settings::config::SyncKey::Key(_)
        ));
    }
}
