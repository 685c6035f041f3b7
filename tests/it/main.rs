//! Integration tests: one binary, so the crate links once.

mod audit;
mod broker;
mod broker_fuzz;
mod broker_proto;
mod capture;
mod cli;
mod control_plane;
mod disk_full;
mod exactly_once;
mod fake_keystone;
mod fake_site;
mod fault_run;
mod faults;
mod fidelity;
mod fleet;
mod helpers;
mod hostile;
mod nats_cluster;
mod postgres;
mod proxy;
mod repair_run;
mod resync;
mod retention;
mod sessions;
mod sync;
mod traces;
