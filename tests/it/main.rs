//! Integration tests: one binary, so the crate links once.

mod audit;
mod broker;
mod broker_fuzz;
mod broker_proto;
mod capture;
mod cli;
mod fake_keystone;
mod fake_site;
mod helpers;
mod proxy;
mod sync;
