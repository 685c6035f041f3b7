//! syncgate keeps OpenStack Keystone identity data in sync across a central site
//! and many edge sites. This library is what the `syncgate` binary runs and what
//! the tests drive: `app::Central` is the central gateway.

pub mod app;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod config;
pub mod edge;
pub mod keystone;
pub mod metrics;
pub mod proxy;
pub mod serve;
pub mod settings;
pub mod store;
pub mod sync;
pub mod telemetry;

pub use app::Central;
pub use config::CentralConfig;
