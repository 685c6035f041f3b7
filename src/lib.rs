//! syncgate keeps OpenStack Keystone identity data in sync across a central site
//! and many edge sites. This library is what the `syncgate` binary runs and what
//! the tests drive. The data path, module by module: `proxy` (central's proxy:
//! capture of writes) → `store` (the op log) → `central` (assembly, publishing,
//! acks, the audit API) → `protocol` (the wire contract both sides share:
//! messages, subjects, sealing) → `broker` (the embedded NATS-protocol server,
//! self-contained) → `edge` (replay against a site's Keystone). Above it all,
//! `cli` (flags, environment, configuration file, the audit client); beside
//! it: `settings` (the typed configuration), `keystone` (what
//! Keystone's API means), `metrics`, `telemetry`, `serve` (HTTP listeners),
//! `redact`, `retry`, and `core`, the ground floor (secrets, what both admin
//! listeners share), which imports nothing else of the crate.

pub mod broker;
pub mod central;
pub mod cli;
pub mod core;
pub mod edge;
pub mod keystone;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod redact;
pub mod retry;
pub mod scope;
pub mod serve;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use central::Central;
pub use settings::config::CentralConfig;
