//! The single integration-test binary: every integration test module is
//! declared here and shares the harness in `support`.
//!
//! Needs PostgreSQL server binaries (see `support::pg_bindir`); `bash .ci/run`
//! installs them when missing.

mod support;

mod audit;
mod backup;
mod bad_input;
mod cli;
mod cold;
mod commands;
mod conformance;
mod crash;
mod damage;
mod ddl;
mod deadconn;
mod deploy;
mod encryption;
mod fault_matrix;
mod faults;
mod harness_smoke;
mod lease;
mod least_privilege;
mod monitoring;
mod oracle;
mod prune_policy;
mod publication;
mod rekey;
mod replay;
mod replication;
mod resilience;
mod s3;
mod s3_archive;
mod schedule;
mod spine;
mod tables;
mod tls;
mod txn;
mod types;
mod verify;
